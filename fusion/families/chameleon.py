"""The Chameleon family (Chameleon Team 2024, arXiv:2405.09818): VQ-GAN codes in the text
vocabulary, next-token loss with the CM3 causal-masked objective."""

from __future__ import annotations

from fusion.config import to_dataclass
from fusion.families.registry import Family, register, sampler_io
from fusion.models.chameleon import Chameleon, ChameleonLoss
from fusion.models.cm3 import CM3Tokens
from fusion.models.packing import SpecialIds, row_length
from fusion.models.schemas import ChameleonModelConfig


def build(model_cfg, tokenizer, image_tokenizer, image_size: int):
    cfg = to_dataclass(model_cfg, ChameleonModelConfig)
    h, w = image_tokenizer.latent_grid(image_size)
    levels = cfg.arch.code_digit_levels
    quantizer = getattr(image_tokenizer, "quantizer_config", None) or {}
    if levels and (quantizer.get("kind") != "fsq" or list(quantizer["levels"]) != list(levels)):
        raise ValueError(f"model.arch.code_digit_levels={list(levels)} must be the image "
                         f"tokenizer's FSQ levels; its quantizer is {quantizer.get('kind')!r}"
                         + (f" with levels {list(quantizer['levels'])}"
                            if quantizer.get("kind") == "fsq" else ""))
    model = Chameleon(cfg.arch, tokenizer.vocab_size, image_tokenizer.codebook_size, h * w,
                      code_grid=(h, w), unused_text_ids=tokenizer.never_generated_ids())
    row_length(cfg.loss.pack_len, model.max_seq_len)  # a bad pack_len fails before training
    cm3 = CM3Tokens(tuple(tokenizer.sentinel_ids()), tokenizer.eoss_id)
    return model, ChameleonLoss(cfg.loss, SpecialIds.from_tokenizer(tokenizer), cm3)


def sampler(model, loss, tokenizer, image_tokenizer, use_cache: bool = True):
    from fusion.sampling.chameleon import ChameleonSampler

    return ChameleonSampler(model, code_grid=model.code_grid,
                            **sampler_io(tokenizer, image_tokenizer, use_cache))


FAMILY = register(Family(
    name="chameleon", model_class=Chameleon, schema=ChameleonModelConfig,
    image_tokenizer_kind="vqgan", default_image_tokenizer="tokenizers/shapes-vqgan",
    build=build, sampler=sampler, weight_prefixes=()))
