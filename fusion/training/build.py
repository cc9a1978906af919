"""Config -> (model, loss, frozen image tokenizer) for each family. Scripts call this."""

from __future__ import annotations

import dataclasses
import logging

from omegaconf import DictConfig, OmegaConf

from fusion.config import resolve_path
from fusion.data.text import TextTokenizer

log = logging.getLogger(__name__)

FAMILIES = ("transfusion", "chameleon")


def to_dataclass(node, cls):
    """A config node (typed DictConfig, plain dict, or already ``cls``) as an instance of its
    schema dataclass, nested fields included; unknown keys fail, naming the key."""
    if isinstance(node, cls):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))


def load_image_tokenizer(path: str):
    """A stage-1 artifact folder -> ``VQTokenizer`` (``"kind": "vqgan"`` in its config.json,
    Chameleon) or ``VAETokenizer`` (anything else the VAE reads, Transfusion)."""
    from fusion.image.artifacts import artifact_kind

    path = resolve_path(path)
    if artifact_kind(path) == "vqgan":
        from fusion.image.vqgan import VQTokenizer

        return VQTokenizer.from_pretrained(path)
    from fusion.image.vae import VAETokenizer

    return VAETokenizer.from_pretrained(path)


def build_family(model_cfg, tokenizer: TextTokenizer, image_tokenizer, image_size: int):
    """Returns (model nn.Module, loss callable)."""
    family = model_cfg.family
    if family == "transfusion":
        from fusion.models.schemas import TransfusionModelConfig
        from fusion.models.transfusion import SpecialIds, Transfusion, TransfusionLoss

        cfg = to_dataclass(model_cfg, TransfusionModelConfig)
        arch = cfg.arch
        grid = image_size // image_tokenizer.downsample_factor
        for name, value in (("latent_channels", image_tokenizer.latent_channels),
                            ("latent_size", grid)):
            given = getattr(arch, name)
            if given is not None and given != value:
                raise ValueError(f"model.arch.{name}={given} but the image tokenizer gives "
                                 f"{value}; leave it unset (null) to take the tokenizer's")
        arch = dataclasses.replace(arch, latent_channels=image_tokenizer.latent_channels,
                                   latent_size=grid)
        model = Transfusion(arch, tokenizer.vocab_size)
        return model, TransfusionLoss(cfg.loss, SpecialIds.from_tokenizer(tokenizer))
    if family == "chameleon":
        from fusion.models.chameleon import Chameleon, ChameleonLoss
        from fusion.models.cm3 import CM3Tokens
        from fusion.models.schemas import ChameleonModelConfig
        from fusion.models.transfusion import SpecialIds

        cfg = to_dataclass(model_cfg, ChameleonModelConfig)
        h, w = image_tokenizer.latent_grid(image_size)
        model = Chameleon(cfg.arch, tokenizer.vocab_size, image_tokenizer.codebook_size, h * w)
        cm3 = CM3Tokens(tuple(tokenizer.sentinel_ids()), tokenizer.eoss_id)
        return model, ChameleonLoss(cfg.loss, SpecialIds.from_tokenizer(tokenizer), cm3)
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def save_model(out_dir, model, model_cfg, tokenizer_path: str, image_tokenizer_path: str,
               extra: dict | None = None):
    """A trained family model as ``config.json`` + ``model.safetensors`` (no pickle)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_model as save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(
        model_cfg, DictConfig) else dataclasses.asdict(model_cfg)
    meta = {"model": cfg, "vocab_size": model.vocab_size, "text_tokenizer": tokenizer_path,
            "image_tokenizer": image_tokenizer_path, **(extra or {})}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_safetensors(model, str(out / "model.safetensors"))
    return out


def load_model(path):
    """Inverse of :func:`save_model` -> (model, loss, text tokenizer, image tokenizer, meta)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_model as load_safetensors

    folder = Path(path)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"model folder {folder} has no {f.name}")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file} is not valid JSON: {err}") from err
    tokenizer = TextTokenizer.from_file(resolve_path(meta["text_tokenizer"]))
    image_tokenizer = load_image_tokenizer(meta["image_tokenizer"])
    model_cfg = OmegaConf.create(meta["model"])
    model, loss = build_family(model_cfg, tokenizer, image_tokenizer, meta["image_size"])
    try:
        load_safetensors(model, str(weights))
    except Exception as err:  # safetensors raises several types for corrupt/mismatched files
        raise ValueError(f"{weights} does not match the model in {cfg_file}: {err}") from err
    return model, loss, tokenizer, image_tokenizer, meta
