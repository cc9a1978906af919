"""Image editing with a fine-tuned model of either family (docs/editing.md): source images and
instructions in, edited images out, in batches, through the family sampler's ``edit``
(fusion.sampling.transfusion / .chameleon). The source image enters clean as context, the
target is generated after the instruction, with two-scale classifier-free guidance over the
instruction (``sampling.guidance_scale``) and the source image (``sampling.image_guidance_scale``)
as in InstructPix2Pix (Brooks et al. 2023, arXiv:2211.09800). ``scripts/edit.py``'s job is
fusion.jobs.edit; the edit grids of a fine-tune are fusion.training.samplers.

Pixel tensors are float (B, 3, H, W) in [-1, 1]; edited images come back uint8 (N, H, W, 3).
"""

from __future__ import annotations

import numpy as np
import torch

from fusion.config import SamplingConfig
from fusion.data.images import to_uint8
from fusion.data.text import TextTokenizer
from fusion.sampling.base import check_overflow_setting, encode_prompts, image_settings


def edit_images(sampler, tokenizer: TextTokenizer, sources: torch.Tensor,
                instructions: list[str], sampling: SamplingConfig, batch_size: int = 16,
                seed_offset: int = 0) -> np.ndarray:
    """Sources (N, 3, H, W) + instructions -> edited uint8 (N, H, W, 3), in batches.

    Every instruction is checked against the model's length before the first edit
    (``sampling.prompt_overflow``: refuse or cut a longer one; an empty one edits without
    an instruction, with a warning)."""
    s = sampling
    overflow = check_overflow_setting(getattr(s, "prompt_overflow", "error"))
    budget = sampler.prompt_budget("edit") if hasattr(sampler, "prompt_budget") else None
    ids = encode_prompts(tokenizer, instructions, budget, overflow, what="instruction")
    out = []
    for b, start in enumerate(range(0, len(instructions), batch_size)):
        pixels = sampler.edit(sources[start:start + batch_size], ids[start:start + batch_size],
                              **image_settings(s, seed=s.seed + seed_offset + b, edit=True))
        out.append(to_uint8(pixels))
    return np.concatenate(out)
