"""Edit accuracy on ShapesWorld, per kind of edit, plus PSNR against the true target.

An edit counts as correct when the ShapesWorld detector, run on the output, finds exactly
the objects the target scene holds:

* every object the edit should leave alone, with its class and colour, its centre within
  ``center_tol`` pixels of where it was;
* the edited object as asked: recoloured in place (``recolor``), at its new place
  (``move``), gone (``remove``), or -- for ``add``, whose instruction says what but not
  where -- the new class and colour anywhere;
* nothing else: an extra object is an unrequested change.

So the unedited source scores 0 on every kind and the rendered target 1 (the detector inverts
the renderer exactly, docs/shapesworld.md). ``center_tol`` defaults to image_size / 16
(4 px at 64 px): a quarter of the shortest move (image_size / 4), and loose enough for a
decoder's sub-pixel blur.

Images are uint8 (N, H, W, 3) arrays or lists of (H, W, 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.config import SamplingConfig
from fusion.data.images import save_grid, to_tensor
from fusion.data.shapes import EDIT_KINDS, ShapeObject, ShapesEdit, ShapesWorld, detect, render
from fusion.distributed import is_first_process, map_split
from fusion.eval.reconstruction import unit_images
from fusion.image.losses import psnr as image_psnr


@dataclass
class EditEvalConfig:
    per_kind: int = 100  # held-out edits of each kind
    # How edits are drawn: guidance over the instruction and over the source image
    # (InstructPix2Pix's s_I), steps, Chameleon's code sampling (fusion.config.SamplingConfig;
    # scripts/evaluate.py passes the model's recorded ones).
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 64
    heldout_start: int = 1_000_000  # scenes from here on are never trained on by default
    center_tol: float | None = None  # pixels; None = image_size / 16


def shapes_edit_set(world: ShapesWorld, per_kind: int, start: int = 1_000_000,
                    kinds: Sequence[str] = EDIT_KINDS) -> list[ShapesEdit]:
    """``per_kind`` held-out edits of each kind, from scene ``start`` on (deterministic).

    ``world.edit(i, kind)`` falls back to another kind when a scene cannot take the asked one
    (e.g. remove from a one-object scene); such edits are skipped so each kind gets its own."""
    out = []
    for kind in kinds:
        if kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
        got, i = 0, start
        while got < per_kind:
            edit = world.edit(i, kind)
            i += 1
            if edit.kind == kind:
                out.append(edit)
                got += 1
    return out


def _key(o: ShapeObject) -> tuple:
    return o.shape, o.color, tuple(o.bbox)


def edit_errors(edit: ShapesEdit, found: Sequence[ShapeObject],
                center_tol: float) -> list[str]:
    """Why ``found`` (detections on an output) is not the asked edit; [] when it is."""
    before = {_key(o) for o in edit.source.objects}
    placed, anywhere = [], []
    for obj in edit.target.objects:
        # An added object may be anywhere; unchanged ones and the recoloured or moved one
        # must be where the target has them.
        (anywhere if edit.kind == "add" and _key(obj) not in before else placed).append(obj)
    remaining = list(found)
    errors = []
    for obj in placed:
        near = [c for c in remaining if (c.shape, c.color) == (obj.shape, obj.color)
                and math.dist(c.center, obj.center) <= center_tol]
        if near:
            remaining.remove(min(near, key=lambda c: math.dist(c.center, obj.center)))
        else:
            x, y = obj.center
            errors.append(f"no {obj.name} at ({x:.0f}, {y:.0f})")
    for obj in anywhere:
        same = [c for c in remaining if (c.shape, c.color) == (obj.shape, obj.color)]
        if same:
            remaining.remove(same[0])
        else:
            errors.append(f"no {obj.name} added")
    errors += [f"unexpected {c.name} at ({c.center[0]:.0f}, {c.center[1]:.0f})"
               for c in remaining]
    return errors


def psnr(targets: np.ndarray | Sequence[np.ndarray],
         outputs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images (fusion.image.losses.psnr), capped at 100 dB for
    identical ones: (N,)."""
    a, b = unit_images(np.stack(list(targets))), unit_images(np.stack(list(outputs)))
    if a.shape != b.shape:
        raise ValueError(f"targets {tuple(a.shape)} and outputs {tuple(b.shape)} differ")
    return image_psnr(b, a, data_range=1.0).numpy()


def score_edits(edits: Sequence[ShapesEdit], outputs: np.ndarray | Sequence[np.ndarray],
                center_tol: float | None = None, progress: bool = False) -> dict:
    """Edit accuracy (overall and per kind) and PSNR against the rendered targets.

    Returns ``{"edits", "edit_accuracy", "psnr", "<kind>": {"edits", "accuracy", "psnr"},
    "results": [per-edit dicts]}``; kinds with no edits are left out."""
    if len(edits) != len(outputs):
        raise ValueError(f"{len(edits)} edits but {len(outputs)} outputs")
    if not len(edits):
        raise ValueError("no edits to score")
    size = edits[0].source.size
    tol = size / 16 if center_tol is None else center_tol
    targets = [render(e.target) for e in edits]
    db = psnr(targets, outputs)
    results = []
    for e, out, p in tqdm(list(zip(edits, outputs, db, strict=True)), desc="edit accuracy",
                          disable=not progress, leave=False):
        errors = edit_errors(e, detect(out), tol)
        results.append({"kind": e.kind, "instruction": e.instruction, "correct": not errors,
                        "errors": errors, "psnr": float(p)})
    summary: dict = {"edits": len(results),
                     "edit_accuracy": float(np.mean([r["correct"] for r in results])),
                     "psnr": float(np.mean(db)), "center_tol": tol}
    for kind in EDIT_KINDS:
        rows = [r for r in results if r["kind"] == kind]
        if rows:
            summary[kind] = {"edits": len(rows),
                             "accuracy": float(np.mean([r["correct"] for r in rows])),
                             "psnr": float(np.mean([r["psnr"] for r in rows]))}
    summary["results"] = results
    return summary


def format_edit_summary(summary: dict) -> str:
    lines = [f"{'kind':8s} {'edits':>6s} {'accuracy':>9s} {'PSNR dB':>8s}"]
    for kind in EDIT_KINDS:
        if kind in summary:
            k = summary[kind]
            lines.append(f"{kind:8s} {k['edits']:6d} {k['accuracy']:9.3f} {k['psnr']:8.2f}")
    lines.append(f"{'all':8s} {summary['edits']:6d} {summary['edit_accuracy']:9.3f} "
                 f"{summary['psnr']:8.2f}")
    return "\n".join(lines)


def save_edit_grid(edits: Sequence[ShapesEdit], outputs: Sequence[np.ndarray], path,
                   limit: int = 32) -> None:
    """A PNG of source | output | target cells captioned with the instruction."""
    cells = [np.concatenate([render(e.source), o, render(e.target)], axis=1)
             for e, o in zip(edits[:limit], outputs[:limit], strict=True)]
    save_grid(cells, path, [e.instruction for e in edits[:limit]], columns=4)


@torch.no_grad()
def evaluate_editing(sampler, tokenizer, image_size: int, cfg: EditEvalConfig | None = None,
                     world_seed: int = 0, progress: bool = True, grid_path=None) -> dict:
    """Edit held-out ShapesWorld scenes with a family sampler (its ``edit``) and score them:
    :func:`score_edits` of ``cfg.per_kind`` edits of each kind."""
    from fusion.sampling.edit import edit_images

    cfg = cfg or EditEvalConfig()
    world = ShapesWorld(seed=world_seed, size=image_size)
    edits = shapes_edit_set(world, cfg.per_kind, cfg.heldout_start)

    def edit(_: int, start: int) -> np.ndarray:  # seeded by its first edit: any rank
        chunk = edits[start:start + cfg.batch_size]
        sources = torch.stack([to_tensor(render(e.source)) for e in chunk])
        return edit_images(sampler, tokenizer, sources, [e.instruction for e in chunk],
                           cfg.sampling, cfg.batch_size, seed_offset=start)

    # dealt to the ranks under torchrun (fusion.distributed); rank 0 writes the grid
    outputs = np.concatenate(map_split(edit, list(range(0, len(edits), cfg.batch_size)),
                                       "editing" if progress else None))
    if grid_path is not None and is_first_process():
        save_edit_grid(edits, outputs, grid_path)
    summary = score_edits(edits, outputs, cfg.center_tol, progress=progress)
    s = cfg.sampling
    summary["settings"] = {"guidance_scale": s.guidance_scale,
                           "image_guidance_scale": s.image_guidance_scale,
                           "diffusion_steps": s.diffusion_steps, "seed": s.seed,
                           "heldout_start": cfg.heldout_start, "world_seed": world_seed}
    return summary


def score_reference(which: str, image_size: int = 64, per_kind: int = 100,
                    start: int = 1_000_000, world_seed: int = 0,
                    center_tol: float | None = None, image_tokenizer=None,
                    local_targets: bool = False) -> dict:
    """Reference scores on the same edits as a model's: ``which="target"`` scores the true
    targets (1.0: a check of the scorer), ``"source"`` the unedited sources (0.0), and
    ``"tokenizer"`` the targets passed through ``image_tokenizer`` (``decode(encode(x))``;
    a stage-1 artifact folder): the ceiling of a model that generates that tokenizer's
    latents or codes perfectly, since the frozen tokenizer draws every output.
    ``local_targets`` (a VQ-GAN): the targets' codes as ``edit_target_codes=local`` trains
    them, the source's codes away from the change."""
    if which not in ("target", "source", "tokenizer"):
        raise ValueError(f"which must be 'target', 'source' or 'tokenizer', got {which!r}")
    edits = shapes_edit_set(ShapesWorld(seed=world_seed, size=image_size), per_kind, start)
    outputs = [render(e.source if which == "source" else e.target) for e in edits]
    if which == "tokenizer":
        from fusion.eval.reconstruction import reconstruct
        from fusion.families import load_image_tokenizer

        if image_tokenizer is None:
            raise ValueError("which='tokenizer' needs image_tokenizer=<artifact folder>")
        sources = [render(e.source) for e in edits] if local_targets else None
        outputs = reconstruct(load_image_tokenizer(image_tokenizer), outputs, progress=False,
                              sources=sources)
    elif local_targets:
        raise ValueError("local_targets needs which='tokenizer'")
    return score_edits(edits, outputs, center_tol)
