"""Stage-1 artifact files, shared by every image tokenizer (VAE, VQ-GAN).

An artifact is a folder ``tokenizers/<name>/`` holding ``config.json`` (what to build) and
``model.safetensors`` (weights only: nothing is unpickled, docs/design.md, Principles), plus a
``card.md``. Every failure to read one raises :class:`TokenizerLoadError` with a message that
names the file and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fusion.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class TokenizerLoadError(UserError):
    """An artifact folder or file is missing, incomplete or corrupt; the message names it."""


def read_json(path: Path) -> dict:
    if not path.exists():
        raise TokenizerLoadError(f"{path}: missing (a tokenizer folder needs {CONFIG_NAME})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerLoadError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise TokenizerLoadError(f"{path}: missing (the weights file)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TokenizerLoadError(f"{path}: corrupt or not a safetensors file ({err})") from err


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)``, strict, failing with a message that names ``path``."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise TokenizerLoadError(f"{path}: weights do not fit the config: {err}") from err
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise TokenizerLoadError(
            f"{path}: weights do not fit the config: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def load_weights(module: nn.Module, path: Path) -> None:
    load_state(module, read_safetensors(path), path)


def jsonable(obj):
    """``json.dumps(default=...)``: tuples/sets as lists, tensors as numbers, else ``str``."""
    if isinstance(obj, tuple | set):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def artifact_kind(path: str | Path) -> str:
    """``"vqgan"`` or ``"vae"``: which tokenizer class reads ``path``.

    A fusion VQ-GAN artifact says ``"kind": "vqgan"`` in its ``config.json``; everything else
    (a fusion VAE artifact, a diffusers ``AutoencoderKL`` folder, a single ``.safetensors``
    file) is the VAE's to read -- and to reject with a message naming the file.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / CONFIG_NAME).exists():
        if read_json(path / CONFIG_NAME).get("kind") == "vqgan":
            return "vqgan"
    return "vae"


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class ImageTokenizer(nn.Module):
    """What every stage-1 image tokenizer (VAE, VQ-GAN) shares: its geometry, the check of its
    input, and its artifact files. A subclass sets :attr:`kind_name` and :attr:`artifact_format`
    and provides ``block_out_channels``, ``config_dict()`` and, when not every tensor of its
    ``state_dict`` is a weight to save, ``weights_state()``."""

    kind_name = "image tokenizer"  # for messages: "VAE", "VQ-GAN"
    artifact_format = ""  # model.safetensors metadata: what wrote the file

    @property
    def block_out_channels(self) -> list[int]:
        raise NotImplementedError

    @property
    def downsample_factor(self) -> int:
        # Every encoder level but the last halves the resolution (diffusers Encoder).
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the latent or code grid for an image of ``image_size`` (int: square)."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.downsample_factor
        if any(s % f for s in hw):
            raise ValueError(f"image size {hw} is not divisible by the {self.kind_name}'s "
                             f"factor f={f}")
        return hw[0] // f, hw[1] // f

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        self.latent_grid(tuple(images.shape[-2:]))

    def config_dict(self) -> dict:
        raise NotImplementedError

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The tensors ``model.safetensors`` holds (default: the whole state dict)."""
        return self.state_dict()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (tensors only; nothing is pickled)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.weights_state().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": self.artifact_format})
        (path / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2,
                                                   default=jsonable) + "\n")
        return path
