"""VAETokenizer: the continuous image tokenizer of the Transfusion family.

A thin wrapper around diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE architecture,
Rombach et al. 2022, arXiv:2112.10752) that adds what a diffusion transformer needs on top:

* a latent **shift and scale measured on data** (:func:`measure_latent_scaling`), so that the
  latents the diffusion loss sees have roughly zero mean and unit variance -- the premise of
  the DDPM noise schedule (the forward process ends at N(0, I)). SD's 0.18215 was measured the
  same way on *its* data; a fresh VAE (or SD's VAE on other data) needs its own figure;
* one artifact format (``config.json`` + ``model.safetensors``) that also records how the
  scale was measured and the held-out figures, and loading from a plain diffusers folder or a
  single ``.safetensors`` file (how a user brings an SD/FLUX VAE, offline).

Shapes::

    B  batch            H, W  image height/width (pixels)
    C  latent channels  h, w  latent grid = (H, W) / f, f = downsample_factor

    images  (B, 3, H, W) float in [-1, 1]
    latents (B, C, h, w) float, (z - shift) * scale, ~zero mean / unit variance on the data

No training logic lives here (docs/design.md, Principles): the LightningModule in
``fusion.training.tokenizer_module`` trains the ``autoencoder`` through :meth:`forward`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL

# File helpers shared with the VQ-GAN (every failure names the file and what is wrong with it).
from fusion.image.artifacts import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ImageTokenizer,
    TokenizerLoadError,
)
from fusion.image.artifacts import load_state as _load_state
from fusion.image.artifacts import load_weights as _load_weights
from fusion.image.artifacts import read_json as _read_json
from fusion.image.artifacts import read_safetensors as _read_safetensors

log = logging.getLogger(__name__)

FORMAT = "fusion.vae"
FORMAT_VERSION = 1
# What diffusers' save_pretrained writes (safetensors by default; .bin is never read here).
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def build_autoencoder(block_out_channels: Iterable[int] = (32, 64, 128, 128),
                      layers_per_block: int = 1, latent_channels: int = 4,
                      norm_num_groups: int = 32, mid_block_add_attention: bool = True,
                      init_posterior_logvar: float | None = None) -> AutoencoderKL:
    """A fresh diffusers ``AutoencoderKL``; ``len(block_out_channels)`` levels -> f = 2**(L-1).

    ``init_posterior_logvar``: start log σ² of q(z|x) at this value (the logvar half of
    ``quant_conv``: zero weights, this bias) instead of ≈0. At σ ≈ 1 the sampled latent is
    about as much noise as signal (the means start O(1)) until the encoder learns to shrink
    σ, steps a CPU-sized budget cannot spare; a KL weight of 1e-6 barely pushes σ back up, so
    this only decides where σ starts. (Not measured in isolation: our runs changed it
    together with other settings, see docs/tokenizers.md.)
    """
    channels = tuple(int(c) for c in block_out_channels)
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels {channels}: {bad} not divisible by "
                         f"norm_num_groups={norm_num_groups} (GroupNorm needs it)")
    levels = len(channels)
    ae = AutoencoderKL(in_channels=3, out_channels=3,
                       down_block_types=("DownEncoderBlock2D",) * levels,
                       up_block_types=("UpDecoderBlock2D",) * levels,
                       block_out_channels=channels, layers_per_block=layers_per_block,
                       latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                       mid_block_add_attention=mid_block_add_attention,
                       scaling_factor=1.0, shift_factor=0.0)
    if init_posterior_logvar is not None:
        with torch.no_grad():  # quant_conv outputs [mean (C), logvar (C)]
            ae.quant_conv.weight[latent_channels:].zero_()
            ae.quant_conv.bias[latent_channels:].fill_(init_posterior_logvar)
    return ae


class VAETokenizer(ImageTokenizer):
    """Images <-> scaled continuous latents, around a diffusers ``AutoencoderKL``.

    ``encode`` returns ``(mean(q(z|x)) - shift) * scale`` and ``decode`` inverts that map
    before the decoder. ``shift``/``scale`` are buffers (saved with the weights, moved with
    ``.to``) and also written to the diffusers config (``shift_factor``/``scaling_factor``)
    so the autoencoder alone stays self-describing.
    """

    kind_name, artifact_format = "VAE", FORMAT

    def __init__(self, autoencoder: AutoencoderKL, shift: float = 0.0, scale: float = 1.0,
                 info: dict | None = None, sample_posterior: bool = True):
        super().__init__()
        self.autoencoder = autoencoder
        # forward() in train mode: decode z ~ q(z|x) (the VAE) or its mean (a plain AE).
        self.sample_posterior = sample_posterior
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.register_buffer("scale", torch.tensor(float(scale)))
        # Provenance and figures for the card/config: how scale was found, held-out metrics.
        self.info: dict = dict(info or {})

    # ---- geometry ----------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def block_out_channels(self) -> list[int]:
        return list(self.autoencoder.config.block_out_channels)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where taming's adaptive GAN weight is measured."""
        return self.autoencoder.decoder.conv_out.weight

    # ---- the tokenizer interface -------------------------------------------------------
    def encode_unscaled(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latents z (B, C, h, w), before shift/scale."""
        self._check_images(images)
        posterior = self.autoencoder.encode(images).latent_dist
        return posterior.sample() if sample else posterior.mean

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, C, h, w) = (z - shift) * scale.

        The posterior *mean* by default: trained with a KL weight of ~1e-6 the posterior std
        is tiny, so a sample differs from the mean only by noise the decoder learnt to ignore;
        the mean makes encoding deterministic (the same image always gives the same diffusion
        target, and cached latents are reproducible). ``sample=True`` draws z ~ q(z|x), as
        LDM's ``get_first_stage_encoding`` does.
        """
        return (self.encode_unscaled(images, sample) - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, H, W), ~[-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got "
                             f"{tuple(latents.shape)}")
        return self.autoencoder.decode(latents / self.scale + self.shift).sample

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass, the stage-1 autoencoder interface shared with the VQ-GAN:
        images (B, 3, H, W) -> (reconstruction (B, 3, H, W), {"kl": mean KL per image}).

        In train mode z ~ q(z|x) when ``sample_posterior`` (else, and in eval mode, its mean).
        Scale/shift do not enter: they are an affine map that the decoder undoes exactly.
        """
        self._check_images(images)
        posterior = self.autoencoder.encode(images).latent_dist
        z = posterior.sample() if self.training and self.sample_posterior else posterior.mode()
        recon = self.autoencoder.decode(z).sample
        # KL summed over latent dims, averaged over the batch (LDM's kl_loss convention).
        return recon, {"kl": posterior.kl().mean()}

    # ---- scaling -----------------------------------------------------------------------
    def set_scaling(self, shift: float, scale: float, how: str) -> None:
        if not (math.isfinite(shift) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"bad latent scaling: shift={shift}, scale={scale}")
        self.shift.fill_(shift)
        self.scale.fill_(scale)
        self.autoencoder.register_to_config(shift_factor=float(shift),
                                            scaling_factor=float(scale))
        self.info["scaling"] = how

    # ---- files -------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "class": "AutoencoderKL",
            "autoencoder": {k: v for k, v in dict(self.autoencoder.config).items()
                            if not k.startswith("_")},
            "shift_factor": float(self.shift),
            "scaling_factor": float(self.scale),
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "info": self.info,
        }

    def weights_state(self) -> dict[str, torch.Tensor]:
        # shift and scale are written to config.json, not to the weights file
        return self.autoencoder.state_dict()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: str | Path | None = None
                        ) -> VAETokenizer:
        """Load, never touching the network:

        * a fusion artifact folder (``config.json`` with ``"format": "fusion.vae"`` +
          ``model.safetensors``), as written by :meth:`save_pretrained`;
        * a diffusers ``AutoencoderKL`` folder (``config.json`` +
          ``diffusion_pytorch_model.safetensors``, e.g. SD's or FLUX's ``vae/`` subfolder);
          its published ``scaling_factor``/``shift_factor`` are used until
          :func:`measure_latent_scaling` replaces them;
        * a single ``.safetensors`` file with ``config`` = a local diffusers config.json (or
          its folder); original (LDM) key names are converted by diffusers.

        A whole diffusers pipeline folder (``vae/`` beside ``unet/`` ...) is refused with a
        message naming its ``vae/`` subfolder.
        """
        path = Path(path).expanduser()
        if path.is_file():
            return cls._from_single_file(path, config)
        if not path.is_dir():
            raise TokenizerLoadError(f"{path}: no such tokenizer folder or file")
        cfg_path = path / CONFIG_NAME
        if not cfg_path.exists() and (path / "vae" / CONFIG_NAME).exists():
            # A whole diffusers pipeline (model_index.json, unet/, vae/, ...): its VAE is the
            # tokenizer. Not taken silently: a model folder copies only the folder it is given.
            raise TokenizerLoadError(f"{path}: a diffusers pipeline folder, not a VAE; pass its "
                                     f"VAE subfolder {path / 'vae'}")
        raw = _read_json(cfg_path)
        if raw.get("format") == FORMAT:
            return cls._from_artifact(path, raw)
        if raw.get("_class_name") == "AutoencoderKL":
            return cls._from_diffusers(path, raw)
        raise TokenizerLoadError(
            f"{cfg_path}: neither a fusion VAE artifact (\"format\": \"{FORMAT}\") nor a "
            f"diffusers AutoencoderKL config (\"_class_name\": \"AutoencoderKL\"); "
            f"found keys {sorted(raw)[:8]}")

    @classmethod
    def _from_artifact(cls, path: Path, raw: dict) -> VAETokenizer:
        cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise TokenizerLoadError(f"{cfg_path}: format_version {raw['format_version']} is "
                                     f"newer than this fusion reads ({FORMAT_VERSION})")
        for key in ("autoencoder", "shift_factor", "scaling_factor"):
            if key not in raw:
                raise TokenizerLoadError(f"{cfg_path}: missing required key {key!r}")
        try:
            autoencoder = AutoencoderKL.from_config(raw["autoencoder"])
        except Exception as err:  # diffusers raises several kinds on a bad config
            raise TokenizerLoadError(f"{cfg_path}: bad 'autoencoder' config: {err}") from err
        _load_weights(autoencoder, weights)
        tok = cls(autoencoder, raw["shift_factor"], raw["scaling_factor"], raw.get("info"))
        return tok.eval()

    @classmethod
    def _from_diffusers(cls, path: Path, raw: dict) -> VAETokenizer:
        weights = path / DIFFUSERS_WEIGHTS
        if not weights.exists():
            raise TokenizerLoadError(
                f"{weights}: missing (a diffusers VAE folder needs its safetensors weights; "
                f"pickled .bin files are not loaded)")
        try:
            # low_cpu_mem_usage=False: the fast path needs `accelerate`, and without it diffusers
            # warns at every load (the SD VAE loads in well under a second without it).
            autoencoder = AutoencoderKL.from_pretrained(path, local_files_only=True,
                                                        use_safetensors=True,
                                                        low_cpu_mem_usage=False)
        except Exception as err:
            raise TokenizerLoadError(f"{path}: diffusers could not load the VAE: {err}") from err
        return cls._published(autoencoder, f"diffusers folder {path}")

    @classmethod
    def _from_single_file(cls, path: Path, config: str | Path | None) -> VAETokenizer:
        if path.suffix != ".safetensors":
            raise TokenizerLoadError(f"{path}: only .safetensors weights are loaded (a pickled "
                                     f"checkpoint could run code)")
        if config is None:
            raise TokenizerLoadError(f"{path}: a single weights file needs config= a local "
                                     f"diffusers AutoencoderKL config.json (or its folder)")
        config = Path(config).expanduser()
        cfg_path = config if config.is_file() else config / CONFIG_NAME
        raw = _read_json(cfg_path)
        try:
            autoencoder = AutoencoderKL.from_config(raw)
        except Exception as err:
            raise TokenizerLoadError(f"{cfg_path}: bad AutoencoderKL config: {err}") from err
        state = _read_safetensors(path)
        if not any(k.startswith("encoder.down_blocks.") for k in state):
            # Original LDM/SD key names (encoder.down.0.block.0..., optionally under
            # first_stage_model. / vae.): diffusers converts them.
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state = convert_ldm_vae_checkpoint(state, dict(autoencoder.config))
        _load_state(autoencoder, state, path)
        return cls._published(autoencoder, f"single file {path}")

    @classmethod
    def _published(cls, autoencoder: AutoencoderKL, where: str) -> VAETokenizer:
        scale = float(autoencoder.config.scaling_factor or 1.0)
        shift = float(autoencoder.config.shift_factor or 0.0)
        info = {"source": where, "scaling": "published in the config (not yet measured)"}
        # Say which scale the latents get: diffusers writes its default 0.18215 (SD's figure)
        # into every AutoencoderKL config, even one trained with no scale measured at all.
        log.info("%s: latents = (z - %g) * %g, its config's shift_factor and scaling_factor "
                 "(not measured on this data; docs/recipes_256.md)", where, shift, scale)
        return cls(autoencoder, shift, scale, info).eval()


def build_vae_tokenizer(cfg) -> VAETokenizer:
    """A ``VAETokenizerConfig`` -> a fresh tokenizer, or a pretrained one from local files."""
    from fusion.config import resolve_path

    if cfg.pretrained:
        config = resolve_path(cfg.pretrained_config) if cfg.pretrained_config else None
        tok = VAETokenizer.from_pretrained(resolve_path(cfg.pretrained), config=config)
    else:
        ae = cfg.autoencoder
        tok = VAETokenizer(build_autoencoder(ae.block_out_channels, ae.layers_per_block,
                                             ae.latent_channels, ae.norm_num_groups,
                                             ae.mid_block_add_attention,
                                             ae.init_posterior_logvar))
    tok.sample_posterior = cfg.sample_posterior
    return tok


# --------------------------------------------------------------------------------------------
# Measuring the latent scaling
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_latent_scaling(tokenizer: VAETokenizer, images: Iterable[torch.Tensor],
                           max_images: int | None = None) -> tuple[float, float, int]:
    """Set ``shift = mean(z)`` and ``scale = 1 / std(z)`` over the posterior means of the
    given image batches (each (B, 3, H, W) in [-1, 1]); returns (shift, scale, images used).

    One scalar each, over all channels and positions, as SD (0.18215) and SD3/FLUX
    (``shift_factor``) do: a scalar keeps the latent geometry (relative channel scales) the
    decoder was trained on. Statistics accumulate in float64 (no catastrophic cancellation).
    """
    was_training = tokenizer.training
    tokenizer.eval()
    total = count = 0.0
    sq = 0.0
    used = 0
    for batch in images:
        if max_images is not None and used >= max_images:
            break
        if max_images is not None:
            batch = batch[: max_images - used]
        z = tokenizer.encode_unscaled(batch.to(tokenizer.shift.device)).double()
        total += z.sum().item()
        sq += z.square().sum().item()
        count += z.numel()
        used += batch.shape[0]
    tokenizer.train(was_training)
    if used == 0:
        raise ValueError("measure_latent_scaling got no images")
    mean = total / count
    std = math.sqrt(max(sq / count - mean * mean, 0.0))
    if std < 1e-8:
        raise ValueError(f"latents have zero spread over {used} images (std={std})")
    tokenizer.set_scaling(mean, 1.0 / std, f"measured: shift=mean, scale=1/std of posterior "
                                           f"means over {used} images")
    return mean, 1.0 / std, used
