"""The Transfusion family (Zhou et al. 2024, arXiv:2408.11039): VAE latents as patches, next-token
loss on text plus λ·diffusion loss on images."""

from __future__ import annotations

import dataclasses

from fusion.config import to_dataclass
from fusion.errors import UserError
from fusion.families.registry import Family, register, sampler_io
from fusion.models.packing import SpecialIds, row_length
from fusion.models.schemas import TransfusionModelConfig
from fusion.models.transfusion import Transfusion, TransfusionLoss


def build(model_cfg, tokenizer, image_tokenizer, image_size: int):
    cfg = to_dataclass(model_cfg, TransfusionModelConfig)
    grid = image_size // image_tokenizer.downsample_factor
    for name, value in (("latent_channels", image_tokenizer.latent_channels),
                        ("latent_size", grid)):
        given = getattr(cfg.arch, name)
        if given is not None and given != value:
            raise UserError(f"model.arch.{name}={given} but the image tokenizer gives "
                            f"{value}; leave it unset (null) to take the tokenizer's")
    arch = dataclasses.replace(cfg.arch, latent_channels=image_tokenizer.latent_channels,
                               latent_size=grid)
    model = Transfusion(arch, tokenizer.vocab_size)
    row_length(cfg.loss.pack_len, model.max_seq_len)  # a bad pack_len fails before training
    return model, TransfusionLoss(cfg.loss, SpecialIds.from_tokenizer(tokenizer))


def sampler(model, loss, tokenizer, image_tokenizer, use_cache: bool = True):
    from fusion.sampling.transfusion import TransfusionSampler

    return TransfusionSampler(model, diffusion=loss.diffusion,
                              **sampler_io(tokenizer, image_tokenizer, use_cache))


FAMILY = register(Family(
    name="transfusion", model_class=Transfusion, schema=TransfusionModelConfig,
    image_tokenizer_kind="vae", default_image_tokenizer="tokenizers/shapes-vae",
    build=build, sampler=sampler, weight_prefixes=("patchifier.",)))
