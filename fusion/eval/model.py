"""Evaluate a trained family model on ShapesWorld: GenEval, FID, captioning.

* text -> image: the ShapesWorld prompt set in GenEval's format (``shapes_prompt_set``),
  ``images_per_tag`` images per tag spread over that tag's prompts, scored by GenEval's rules
  with the ShapesWorld detector; FID/KID of all generated images against held-out real scenes
  (ShapesWorld feature net).
* image -> text: held-out scenes captioned greedily, scored with
  ``fusion.eval.captioning.score_captions`` (``single_object_accuracy`` = right class and
  colour for one-object images).

Works for any family's sampler (fusion.sampling.base.FamilySampler): ``generate_images`` with
the settings of ``cfg.sampling`` (fusion.sampling.base.image_settings), and ``caption``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fusion.config import SamplingConfig
from fusion.data.images import save_grid, to_tensor, to_uint8
from fusion.data.prompts import shapes_prompt_set
from fusion.data.shapes import TAGS, ShapesWorld
from fusion.distributed import is_first_process, map_split
from fusion.sampling.base import image_settings


@dataclass
class ModelEvalConfig:
    images_per_tag: int = 100  # GenEval: images per tag, spread over the tag's prompts
    caption_images: int = 200  # image -> text: held-out single-object scenes
    # How images are drawn (guidance, steps, interval, Chameleon's temperature / top-k / top-p):
    # the one settings object (fusion.config.SamplingConfig); batch b draws with seed
    # sampling.seed + b. Captions are always greedy.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 64
    heldout_start: int = 1_000_000  # scenes from here on are never trained on by default
    fid: bool = True
    # Also write the generated images here in GenEval's folder layout (fusion.eval.geneval),
    # for GenEval's own scorer or scripts/evaluate.py geneval.
    keep_images: str | None = None


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def evaluate_model(sampler, tokenizer, image_size: int, cfg: ModelEvalConfig | None = None,
                   world_seed: int = 0, progress: bool = True,
                   grid_path: str | Path | None = None) -> dict:
    """Returns the figures; with ``grid_path``, also saves a PNG of generated images (one per
    prompt, captioned with the prompt) and ``<grid_path stem>_captions.png`` of captioned
    held-out scenes."""
    from fusion.eval.captioning import score_captions
    from fusion.eval.detectors import ShapesDetector
    from fusion.eval.geneval import score_geneval

    cfg = cfg or ModelEvalConfig()
    s = cfg.sampling
    world = ShapesWorld(seed=world_seed, size=image_size)
    prompts = shapes_prompt_set(world, start=cfg.heldout_start)
    by_tag = {t: [p for p in prompts if p.tag == t] for t in TAGS}
    jobs: list[tuple[int, str]] = []  # (prompt index, text), one per image
    for recs in by_tag.values():
        if not recs:
            continue
        # fewer images than prompts: an evenly spread subset of the tag's prompts
        recs = recs[::math.ceil(len(recs) / cfg.images_per_tag)]
        per_prompt = math.ceil(cfg.images_per_tag / len(recs))
        for rec in recs:
            jobs += [(prompts.index(rec), rec.prompt)] * per_prompt
    images: list[list[np.ndarray]] = [[] for _ in prompts]
    generated = []
    batches = list(_chunks(jobs, cfg.batch_size))

    def draw(b: int, chunk: list) -> np.ndarray:  # batch b: seed + b, on whichever rank
        return to_uint8(sampler.generate_images([tokenizer.encode(t) for _, t in chunk],
                                                **image_settings(s, seed=s.seed + b)))

    # Batches are dealt to the ranks under torchrun (fusion.distributed); every rank scores
    # all of them, and only rank 0 writes files.
    drawn = map_split(draw, batches, "text->image" if progress else None)
    for chunk, pixels in zip(batches, drawn, strict=True):
        for (i, _), img in zip(chunk, pixels, strict=True):
            images[i].append(img)
            generated.append(img)
    keep = [i for i, imgs in enumerate(images) if imgs]
    writes = is_first_process()
    if grid_path is not None and writes:
        shown = [i for i in keep][::max(1, len(keep) // 32)][:32]
        save_grid([images[i][0] for i in shown], grid_path, [prompts[i].prompt for i in shown])
    geneval = score_geneval([images[i] for i in keep], [prompts[i] for i in keep],
                            ShapesDetector(), progress=progress)
    if cfg.keep_images and writes:
        from fusion.eval.geneval import write_geneval_folder

        write_geneval_folder(cfg.keep_images, [prompts[i] for i in keep],
                             [images[i] for i in keep], overwrite=True)
    results = {"geneval_overall": geneval["overall"],
               **{f"geneval_{t}": v for t, v in geneval["tasks"].items()},
               "geneval_empty_share": geneval["empty_images"],
               "generated_images": len(generated)}
    if cfg.fid:
        from fusion.eval.fid import ImageSet, compute_fid

        fid = compute_fid(ImageSet.shapes(2000, seed=world_seed, size=image_size),
                          ImageSet.arrays(np.stack(generated), name="generated"))
        results["fid_shapes"] = fid["fid"]
    # image -> text on held-out single-object scenes
    scenes, arrays = [], []
    index = cfg.heldout_start + 500_000
    while len(scenes) < cfg.caption_images:
        scene = world.scene(index)
        if len(scene.objects) == 1:
            scenes.append(scene)
            arrays.append(world.image(index))
        index += 1

    def describe(_: int, chunk: list) -> list[str]:  # greedy: the same on any rank
        return [tokenizer.decode(x) for x in sampler.caption(
            torch.stack([to_tensor(a) for a in chunk]))]

    captions = sum(map_split(describe, list(_chunks(arrays, cfg.batch_size)),
                             "image->text" if progress else None), [])
    cap = score_captions(captions, scenes)
    if grid_path is not None and writes:
        grid_path = Path(grid_path)
        save_grid(arrays[:16], grid_path.with_name(grid_path.stem + "_captions.png"),
                  captions[:16])
    results.update({"caption_single_object_accuracy": cap["single_object_accuracy"],
                    "caption_single_object_class_accuracy": cap["single_object_class_accuracy"],
                    "caption_images": cap["images"]})
    results["caption_examples"] = [
        {"truth": s.objects[0].name, "caption": c} for s, c in zip(scenes[:5], captions[:5],
                                                                   strict=True)]
    return results
