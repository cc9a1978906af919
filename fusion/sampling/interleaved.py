"""Interleaved documents from text prompts, for the pipeline, the scripts and the evaluation:
prompt texts in, each document's text pieces (str) and images (float (3, H, W) in [-1, 1]) out,
through a family sampler's ``generate_interleaved`` (fusion.sampling.base)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion.distributed import check_split, map_split
from fusion.sampling.base import encode_prompts, image_settings
from fusion.sampling.text import TokenSampling


@torch.no_grad()
def generate_documents(sampler, tokenizer, prompts: Sequence[str], settings,
                       max_new_tokens: int = 96, max_images: int = 4,
                       text_sampling: TokenSampling | None = None,
                       progress: bool = True) -> tuple[list[list], list[str]]:
    """-> (documents, why each stopped). A document is its prompt (str), then the model's
    text pieces (str) and images (float (3, H, W) in [-1, 1], on the CPU) in order.
    ``settings``: a SamplingConfig (guidance, steps, Chameleon's code sampling, seed,
    prompt_overflow); prompt ``i`` is drawn from seed ``settings.seed + i``. Text is greedy
    unless ``text_sampling`` says otherwise."""
    check_split(len(prompts), "prompt(s)")
    ids = encode_prompts(tokenizer, list(prompts), sampler.prompt_budget("interleaved"),
                         settings.prompt_overflow)

    def one(i: int, prompt_ids: list[int]) -> tuple[list, str]:
        # prompt i alone with seed + i: what the whole list in one call draws for it
        (doc,) = sampler.generate_interleaved([prompt_ids], max_new_tokens, max_images,
                                              progress=False, text_sampling=text_sampling,
                                              **image_settings(settings, seed=settings.seed + i))
        return ([tokenizer.decode(x) if isinstance(x, list) else x.float().cpu()
                 for x in doc.segments], doc.stopped)

    # Prompts are dealt to the ranks when several processes run (fusion.distributed).
    done = map_split(one, ids, "interleaved" if progress else None)
    return [d for d, _ in done], [stop for _, stop in done]
