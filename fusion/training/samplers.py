"""Family-agnostic entry to the samplers: what the grid callback and scripts/sample.py call."""

from __future__ import annotations

from fusion.data.text import TextTokenizer
from fusion.sampling.text import TokenSampling


def family_sampler(model, loss, tokenizer: TextTokenizer, image_tokenizer,
                   use_cache: bool = True):
    """The sampler object of ``model``'s family."""
    from fusion.models.transfusion import SpecialIds, Transfusion

    if isinstance(model, Transfusion):
        from fusion.sampling.transfusion import TransfusionSampler

        return TransfusionSampler(model, SpecialIds.from_tokenizer(tokenizer), loss.diffusion,
                                  decode_latents=image_tokenizer.decode,
                                  encode_images=image_tokenizer.encode, use_cache=use_cache)
    from fusion.models.chameleon import Chameleon

    if isinstance(model, Chameleon):
        from fusion.sampling.chameleon import ChameleonSampler

        return ChameleonSampler(model, SpecialIds.from_tokenizer(tokenizer), model.code_grid,
                                decode_codes=image_tokenizer.decode,
                                encode_images=image_tokenizer.encode, use_cache=use_cache)
    raise TypeError(f"no sampler for {type(model).__name__}")


def make_image_sampler(cfg, tokenizer: TextTokenizer, image_tokenizer, loss,
                       check_prompts_for=None):
    """model -> (prompt texts -> pixels), with the run's sampling settings (guidance, steps,
    and for Chameleon's image codes temperature / top-k / top-p). ``check_prompts_for``: a
    model whose prompt budget ``sampling.prompts`` are checked against now, so a grid prompt
    that does not fit fails before training rather than at its end."""
    from fusion.sampling.base import check_overflow_setting, encode_prompts

    s = cfg.sampling
    token_sampling = TokenSampling.from_config(s)
    overflow = check_overflow_setting(s.prompt_overflow)
    if check_prompts_for is not None and s.prompts:
        was_training = check_prompts_for.training  # a sampler puts its model in eval mode
        sampler = family_sampler(check_prompts_for, loss, tokenizer, image_tokenizer)
        check_prompts_for.train(was_training)
        encode_prompts(tokenizer, list(s.prompts), sampler.prompt_budget("text_to_image"),
                       overflow, what="sampling.prompts entry")

    def for_model(model):
        sampler = family_sampler(model, loss, tokenizer, image_tokenizer)

        def generate(prompts: list[str]):
            ids = encode_prompts(tokenizer, prompts, sampler.prompt_budget("text_to_image"),
                                 overflow)
            return sampler.generate_images(ids, guidance_scale=s.guidance_scale,
                                           steps=s.diffusion_steps, seed=s.seed,
                                           sampling=token_sampling)
        return generate

    return for_model
