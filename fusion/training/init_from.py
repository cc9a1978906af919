"""Fine-tuning initialisation (``init_from``): start a run from a model folder, a
``.safetensors`` file or a Lightning ``.ckpt`` after checking that it fits the run."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from fusion.config import resolve_path
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.families.folders import (
    check_weights,
    image_tokenizer_fingerprint,
    image_tokenizer_matches,
    read_model_config,
    text_tokenizer_fingerprint,
    text_vocabulary,
)
from fusion.families.registry import family_of_weights

log = logging.getLogger(__name__)


class InitFromError(UserError):
    """``init_from`` weights do not fit the run; the message lists every difference found."""


def read_init_weights(path) -> tuple[dict, dict | None]:
    """(state dict, the saved ``config.json`` or None) from a model folder, a
    ``model.safetensors`` file, or a Lightning ``.ckpt`` (its EMA weights when it has them,
    like the saved model folder).

    Nothing is unpickled (docs/design.md, Principles): safetensors, or ``torch.load`` with
    ``weights_only=True``. A ``.ckpt`` is matched with ``<run>/model/config.json`` when
    that exists next to its ``<run>/checkpoints/`` folder."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_path(path)

    def weights_at(file: Path) -> dict:
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise InitFromError(f"init_from={path}: {file} is corrupt or not a safetensors "
                                f"file ({err})") from err

    def meta_at(cfg_file: Path) -> dict | None:
        if not cfg_file.is_file():
            return None
        return read_model_config(cfg_file, InitFromError)

    def checked(weights: Path, meta: dict | None) -> tuple[dict, dict | None]:
        """The weights of a model folder, verified against its recorded sha256 (after
        reading them, so a file that is no safetensors at all is reported as such)."""
        state = weights_at(weights)
        if meta is not None and weights.name == "model.safetensors":
            check_weights(weights, meta, weights.parent / "config.json", InitFromError)
        return state, meta

    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file() or not (p / "config.json").is_file():
            raise InitFromError(f"init_from={path}: a model folder needs config.json and "
                                "model.safetensors (what scripts/train.py writes to "
                                "<output_dir>/model)")
        return checked(weights, meta_at(p / "config.json"))
    if not p.is_file():
        raise InitFromError(f"init_from={path}: no such file or folder")
    if p.suffix == ".safetensors":
        return checked(p, meta_at(p.parent / "config.json"))
    if p.suffix == ".ckpt":
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle refuses non-tensor objects under weights_only
            raise InitFromError(f"init_from={path}: not a loadable Lightning checkpoint with "
                                f"weights_only=True: {err}") from err
        sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise InitFromError(f"init_from={path}: no 'state_dict' in this checkpoint")
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in sd) else "model."
        state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return state, meta_at(p.parent.parent / "model" / "config.json")
    raise InitFromError(f"init_from={path}: expected a model folder (config.json + "
                        "model.safetensors), a .safetensors file or a Lightning .ckpt")


def _first_difference(a: list[str], b: list[str]) -> str:
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return f"first at id {i}: {a[i]!r} vs {b[i]!r}"


def _text_differences(meta: dict, tokenizer: TextTokenizer, run_path: str) -> list[str]:
    saved_path = meta.get("text_tokenizer")
    fix = f"set data.text_tokenizer={saved_path}" if saved_path else "use the same text tokenizer"
    ours = text_vocabulary(tokenizer)
    saved = None
    if saved_path and resolve_path(saved_path).exists():
        saved = text_vocabulary(TextTokenizer.from_file(resolve_path(saved_path)))
    elif meta.get("text_tokenizer_sha256"):
        if meta["text_tokenizer_sha256"] == text_tokenizer_fingerprint(tokenizer):
            return []
        return [f"text tokenizer: the checkpoint's ({saved_path}, no longer on disk) has "
                f"different tokens from this run's ({run_path}); {fix}"]
    if saved is None:
        log.warning("init_from: cannot compare text tokenizers (%s is not on disk); checking "
                    "vocabulary size only", saved_path)
        return []
    if len(saved) != len(ours):
        return [f"text vocabulary: the checkpoint's tokenizer ({saved_path}) has {len(saved)} "
                f"tokens, this run's ({run_path}) has {len(ours)}; {fix}"]
    if saved != ours:
        return [f"text tokenizer: same size ({len(ours)}) but different tokens "
                f"({_first_difference(saved, ours)}) between {saved_path} and {run_path}; {fix}"]
    return []


def _image_differences(meta: dict, run_path: str, image_size: int) -> list[str]:
    out = []
    saved_path = meta.get("image_tokenizer")
    same_path = saved_path and resolve_path(saved_path).resolve() == resolve_path(
        run_path).resolve()
    # Compared even at the same path: a retrained artifact there is a different tokenizer.
    saved = meta.get("image_tokenizer_sha256") or (
        None if same_path or not saved_path else image_tokenizer_fingerprint(saved_path))
    if saved_path and saved is None and not same_path:
        log.warning("init_from: cannot compare image tokenizers (%s is not on disk)",
                    saved_path)
    elif saved is not None and not image_tokenizer_matches(saved, run_path):
        out.append(f"image tokenizer: the checkpoint was trained with a different artifact at "
                   f"{saved_path}, which its files no longer match; restore it or point "
                   f"image_tokenizer= at a copy" if same_path else
                   f"image tokenizer: the checkpoint was trained with {saved_path}, this "
                   f"run uses {run_path} (different files); set image_tokenizer={saved_path}")
    if meta.get("image_size") not in (None, image_size):
        out.append(f"image size: the checkpoint was trained at {meta['image_size']} px, this "
                   f"run uses data.image_size={image_size}")
    return out


# Weights a fine-tune may add to its start model, initialised to zero (Chameleon's
# source_alignment projection, which leaves the start model's function unchanged, and its
# source_copy gate, which only acts on editing targets, and its code-digit head, which adds
# zero to every logit until trained).
STARTS_AT_ZERO = ("source_proj.", "copy_gate.", "digit_head.")


def _weight_differences(model, state: dict) -> list[str]:
    own = model.state_dict()
    # Tied weights are stored once (safetensors drops duplicates): a key missing from the file
    # is fine when a tensor it shares storage with is there.
    aliases: dict[int, list[str]] = {}
    for k, v in own.items():
        aliases.setdefault(v.data_ptr(), []).append(k)
    missing = [k for k, v in own.items()
               if k not in state and not any(a in state for a in aliases[v.data_ptr()])
               and not k.startswith(STARTS_AT_ZERO)]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    out = []
    vocab = ("embed.weight", "lm_head.weight")
    if "embed.weight" in differ and state["embed.weight"].shape[0] != own["embed.weight"].shape[0]:
        # Chameleon's vocabulary is the text vocabulary + the VQ-GAN's codebook
        out.append(f"vocabulary size: the checkpoint has {state['embed.weight'].shape[0]} ids, "
                   f"this model {own['embed.weight'].shape[0]}")
        differ = [k for k in differ if k not in vocab]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, this model {tuple(own[k].shape)}"
              for k in differ]
    if shapes:
        out.append(f"weight shapes: {len(shapes)} tensor(s) differ (" + "; ".join(shapes[:4])
                   + (" ..." if len(shapes) > 4 else "") + ")")
    if missing:
        out.append(f"{len(missing)} weight(s) missing from the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        out.append(f"{len(unexpected)} weight(s) in the checkpoint that this model lacks "
                   f"(e.g. {unexpected[:3]})")
    return out


def _arch_differences(saved: dict, ours: dict, where: str = "model.arch.") -> list[str]:
    """Config values that differ, as ``key: checkpoint X, this run Y`` (unset = default)."""
    out = []
    for k in sorted(set(saved) | set(ours)):
        a, b = saved.get(k), ours.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _arch_differences(a, b, f"{where}{k}.")
        elif a != b:
            show = [repr(v) if k in d else "unset" for v, d in ((a, saved), (b, ours))]
            out.append(f"{where}{k}: checkpoint {show[0]}, this run {show[1]}")
    return out


def init_from_checkpoint(model, cfg, tokenizer: TextTokenizer) -> dict:
    """Load ``cfg.init_from`` into ``model`` (a fresh ``build_family`` model of run ``cfg``)
    for fine-tuning; returns the checkpoint's saved config (``{}`` when it has none).

    Before touching the weights, checks that the checkpoint fits this run -- same family, same
    text tokenizer and vocabulary, same image tokenizer and image size, same weight names and
    shapes -- and raises :class:`InitFromError` listing everything that differs and how to
    fix it (a checkpoint from the other family, or trained with another tokenizer, would
    otherwise load garbage or fail deep inside torch)."""
    path = cfg.init_from
    state, meta = read_init_weights(path)
    family = cfg.model.family
    diffs = []
    if meta is not None:
        saved_family = (meta.get("model") or {}).get("family")
        if saved_family != family:
            diffs.append(f"family: the checkpoint is a {saved_family!r} model, this run "
                         f"trains {family!r} (pick the matching experiment, e.g. "
                         f"experiment=edit_{saved_family}_tiny)")
        diffs += _text_differences(meta, tokenizer, cfg.data.text_tokenizer)
        diffs += _image_differences(meta, cfg.image_tokenizer, cfg.data.image_size)
    else:
        log.warning("init_from=%s has no config.json beside it: checking family and weight "
                    "shapes only", path)
        recognised = family_of_weights(state)
        saved_family = recognised.name if recognised is not None else family
        if saved_family != family:
            diffs.append(f"family: the checkpoint's weights are a {saved_family!r} model's, "
                         f"this run trains {family!r}")
    if saved_family == family:  # the other family's weights differ everywhere: say it once
        weights = _weight_differences(model, state)
        if weights and meta is not None:
            ours = OmegaConf.to_container(cfg.model.arch, resolve=True)
            weights += _arch_differences((meta.get("model") or {}).get("arch") or {}, ours)
        diffs += weights
    if diffs:
        raise InitFromError(f"init_from={path} does not fit this run:\n  - "
                            + "\n  - ".join(diffs))
    saved_loss = ((meta or {}).get("model") or {}).get("loss") or {}
    if "diffusion" in saved_loss:  # another objective (ddpm -> flow) loads but starts over
        ours = OmegaConf.to_container(cfg.model.loss.diffusion, resolve=True)
        sampling_only = ("sample_steps", "guidance_interval")  # how to sample, not to train
        saved = {k: v for k, v in saved_loss["diffusion"].items() if k not in sampling_only}
        ours = {k: v for k, v in ours.items() if k not in sampling_only}
        for d in _arch_differences(saved, ours, "model.loss.diffusion."):
            log.warning("init_from: %s", d)
    model.load_state_dict(state, strict=False)  # completeness was checked above
    log.info("initialised %s weights from %s", family, path)
    return meta or {}
