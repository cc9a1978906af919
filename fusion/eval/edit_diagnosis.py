"""Where a Chameleon edit model goes wrong: the cells it should copy, or the cells that change.

An edit's target code grid, as ``edit_target_codes=local`` trains it
(:func:`fusion.models.chameleon.local_edit_codes`), splits into *copy cells* (the source's code)
and *changed cells* (the encoded target's code near a changed pixel). Edit accuracy alone does
not say which of the two a model gets wrong, and one wrong cell fails an edit, so this measures
both on held-out ShapesWorld edits:

* teacher-forced: with the true target codes as context, how often the argmax is the target
  code, and its negative log-likelihood (nats), on each kind of cell;
* sampled: how often the drawn code equals the target code on each kind of cell, and the edit
  accuracy of the drawn grid;
* oracle composites: the edit accuracy when the drawn grid's copy cells, or its changed cells,
  are replaced by the true ones, and of the true grid itself (the tokenizer ceiling under
  local targets). The gap between "true copy cells" and "true changed cells" says which kind
  of cell limits the model.

Shape legend: N = edits, h/w = code grid, S = document positions, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusion.data.images import to_tensor, to_uint8
from fusion.data.shapes import ShapesEdit, render
from fusion.eval.editing import score_edits
from fusion.models.attention import AttentionLayout
from fusion.models.chameleon import Chameleon, image_cells, local_edit_codes, source_alignment
from fusion.sampling.text import TokenSampling


@torch.no_grad()
def teacher_forced_cells(model: Chameleon, special, instructions: list[list[int]],
                         source_codes: torch.Tensor, target_codes: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, h, w) of sources and targets + instruction ids -> (argmax == target (N, h·w)
    bool, target's negative log-likelihood (N, h·w)), with the image-code range only (what the
    sampler draws from), for the documents ``<bos> <boi> source <eoi> instruction <boi> target
    <eoi>``. Right padding: attention is causal, so it never reaches a real position."""
    s, vocab, device = special, model.text_vocab, model.embed.weight.device
    n_codes = source_codes[0].numel()
    docs = [[s.bos, s.boi, *(src.flatten() + vocab).tolist(), s.eoi, *ins, s.boi,
             *(tgt.flatten() + vocab).tolist(), s.eoi]
            for src, tgt, ins in zip(source_codes, target_codes, instructions, strict=True)]
    longest = max(map(len, docs))
    ids = torch.full((len(docs), longest), s.pad, dtype=torch.long)
    aligned = torch.full_like(ids, -1)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.tensor(d)
        real[i, :len(d)] = True
        if model.source_proj is not None:
            aligned[i, :len(d)] = torch.tensor(source_alignment(d, s.boi, s.eoi, vocab))
    ids, aligned, real = ids.to(device), aligned.to(device), real.to(device)
    layout = AttentionLayout(torch.where(real, 0, -1), torch.full_like(ids, -1))
    cells = image_cells(ids, s.boi, vocab) if model.image_pos is not None else None
    logits = model(ids, layout, cells=cells,
                   source=aligned if model.source_proj is not None else None)  # (N, S, V)
    # the target's <boi> (n_codes + 2 from each document's end) predicts cell 0
    first = torch.tensor([len(d) - n_codes - 2 for d in docs], device=device)
    rows = first.unsqueeze(1) + torch.arange(n_codes, device=device)  # (N, h·w)
    at = logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logp = at[..., vocab:].float().log_softmax(-1)  # (N, h·w, codebook)
    truth = target_codes.flatten(1).to(device)
    nll = -logp.gather(-1, truth.unsqueeze(-1))[..., 0]
    return logp.argmax(-1) == truth, nll


def _split(values: torch.Tensor, changed: torch.Tensor) -> dict[str, float]:
    values = values.float().cpu()
    return {"copy": float(values[~changed].mean()) if (~changed).any() else float("nan"),
            "changed": float(values[changed].mean()) if changed.any() else float("nan")}


def diagnose_chameleon_edits(sampler, tokenizer, image_tokenizer, edits: Sequence[ShapesEdit],
                             guidance_scale: float | None, image_guidance_scale: float | None,
                             sampling: TokenSampling, seed: int = 0, batch_size: int = 64,
                             center_tol: float | None = None) -> dict:
    """The measurements of the module docstring for a Chameleon ``sampler``
    (fusion.sampling.chameleon.ChameleonSampler, any ``edit_target_codes`` it was trained
    with: the split is always the local one) on ``edits``."""
    model = sampler.model
    if not isinstance(model, Chameleon):
        raise ValueError("the edit diagnosis splits VQ-GAN code grids: Chameleon models only")
    device = model.embed.weight.device
    image_tokenizer.eval()
    sources = torch.stack([to_tensor(render(e.source)) for e in edits])
    targets = torch.stack([to_tensor(render(e.target)) for e in edits])
    instructions = [tokenizer.encode(e.instruction) for e in edits]
    right, nll, drawn, truth, source_codes = [], [], [], [], []
    decode, sampler.decode_images = sampler.decode_images, None  # the sampler returns codes
    try:
        for start in range(0, len(edits), batch_size):
            part = slice(start, start + batch_size)
            src, tgt = sources[part].to(device), targets[part].to(device)
            with torch.no_grad():
                src_codes, tgt_codes = image_tokenizer.encode(src), image_tokenizer.encode(tgt)
            local = local_edit_codes(src_codes, tgt_codes, src, tgt)
            r, n = teacher_forced_cells(model, sampler.special, instructions[part], src_codes,
                                        local)
            right.append(r.cpu()), nll.append(n.cpu())
            truth.append(local.cpu()), source_codes.append(src_codes.cpu())
            drawn.append(sampler.edit(src, instructions[part], guidance_scale=guidance_scale,
                                      image_guidance_scale=image_guidance_scale,
                                      seed=seed + start // batch_size, sampling=sampling).cpu())
    finally:
        sampler.decode_images = decode
    truth, drawn = torch.cat(truth), torch.cat(drawn)  # (N, h, w)
    changed = truth != torch.cat(source_codes)

    def accuracy(grid: torch.Tensor) -> float:
        with torch.no_grad():
            pixels = torch.cat([image_tokenizer.decode(grid[i:i + batch_size].to(device)).cpu()
                                for i in range(0, len(grid), batch_size)])
        return score_edits(edits, to_uint8(pixels), center_tol)["edit_accuracy"]

    flat_changed = changed.flatten(1)
    return {
        "edits": len(edits),
        "changed_cells_per_edit": float(flat_changed.float().sum(1).mean()),
        "teacher_forced_accuracy": _split(torch.cat(right), flat_changed),
        "teacher_forced_nll": _split(torch.cat(nll), flat_changed),
        "sampled_code_match": _split((drawn == truth).flatten(1), flat_changed),
        "edits_with_every_copy_cell_right": float(np.mean(
            [bool((d == t)[~c].all()) for d, t, c in zip(drawn, truth, changed, strict=True)])),
        "edit_accuracy": {
            "sampled": accuracy(drawn),
            "true_copy_cells": accuracy(torch.where(changed, drawn, truth)),
            "true_changed_cells": accuracy(torch.where(changed, truth, drawn)),
            "true_grid": accuracy(truth),
        },
    }


def format_diagnosis(d: dict) -> str:
    """A few lines for the terminal."""
    tf, nll, match, acc = (d["teacher_forced_accuracy"], d["teacher_forced_nll"],
                           d["sampled_code_match"], d["edit_accuracy"])
    return "\n".join([
        f"{d['edits']} edits, {d['changed_cells_per_edit']:.1f} changed cells per edit",
        f"{'':22}{'copy cells':>12}{'changed cells':>15}",
        f"{'teacher-forced right':22}{tf['copy']:12.3f}{tf['changed']:15.3f}",
        f"{'teacher-forced nll':22}{nll['copy']:12.3f}{nll['changed']:15.3f}",
        f"{'sampled = target':22}{match['copy']:12.3f}{match['changed']:15.3f}",
        f"edits with every copy cell right: {d['edits_with_every_copy_cell_right']:.3f}",
        "edit accuracy: sampled {sampled:.3f}; with the true copy cells {true_copy_cells:.3f}; "
        "with the true changed cells {true_changed_cells:.3f}; true grid {true_grid:.3f}"
        .format(**acc),
    ])
