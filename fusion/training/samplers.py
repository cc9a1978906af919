"""The samplers a training run draws its sample grids with (fusion.training.callbacks.SampleGrid),
for any family (fusion.families.family_sampler)."""

from __future__ import annotations

import torch

from fusion.data.images import to_tensor
from fusion.data.text import TextTokenizer
from fusion.families import family_sampler
from fusion.sampling.base import check_overflow_setting, encode_prompts, image_settings


def make_image_sampler(cfg, tokenizer: TextTokenizer, image_tokenizer, loss,
                       check_prompts_for=None):
    """model -> (prompt texts -> pixels), with the run's sampling settings (guidance, steps,
    and for Chameleon's image codes temperature / top-k / top-p). ``check_prompts_for``: a
    model whose prompt budget ``sampling.prompts`` are checked against now, so a grid prompt
    that does not fit fails before training rather than at its end."""
    s = cfg.sampling
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
            return sampler.generate_images(ids, **image_settings(s))
        return generate

    return for_model


def make_edit_sampler(cfg, tokenizer: TextTokenizer, image_tokenizer, loss, records: list):
    """For the training grid (fusion.training.callbacks.SampleGrid): model -> (instructions ->
    pixels (B, 3, H, 3W), each source | edited | target side by side) over fixed held-out
    ``records`` (EditRecord); the grid's captions must be their instructions, in order."""
    sources = torch.stack([to_tensor(r.source) for r in records])
    targets = torch.stack([to_tensor(r.target) for r in records])

    def for_model(model):
        sampler = family_sampler(model, loss, tokenizer, image_tokenizer)

        def generate(instructions: list[str]) -> torch.Tensor:
            if list(instructions) != [r.instruction for r in records]:
                raise ValueError("the edit grid's captions must be its records' instructions")
            edited = sampler.edit(sources, [tokenizer.encode(t) for t in instructions],
                                  **image_settings(cfg.sampling, edit=True))
            return torch.cat([sources.to(edited.device), edited.float(),
                              targets.to(edited.device)], dim=-1)
        return generate

    return for_model
