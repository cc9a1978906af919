"""Write ShapesWorld to disk in the folder layout that ``fusion.data.sources`` reads."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from fusion.data.prompts import shapes_prompt_set, write_prompts
from fusion.data.shapes import ShapesWorld, render
from fusion.data.sources import ShapesSource


def export_shapes(out_dir: str | Path, num_images: int, seed: int = 0, size: int = 64,
                  start: int = 0, num_edits: int = 0, show_progress: bool = True) -> dict:
    """Images + ``captions.jsonl`` (+ ``edits.jsonl``) + ``evaluation_metadata.jsonl``.

    Captions are the ones :class:`ShapesSource` trains on, so a folder export of ShapesWorld
    and the on-the-fly source give the same (image, caption) pairs.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    source = ShapesSource(num_images, seed=seed, size=size, offset=start)
    with (out / "captions.jsonl").open("w", encoding="utf-8") as fh:
        for i in tqdm(range(num_images), desc="images", disable=not show_progress):
            rec = source[i]
            name = f"images/{start + i:07d}.png"
            Image.fromarray(rec.image).save(out / name)
            fh.write(json.dumps({"file": name, "caption": rec.caption}) + "\n")
    world = ShapesWorld(seed=seed, size=size)
    if num_edits:
        (out / "edits").mkdir(exist_ok=True)
        with (out / "edits.jsonl").open("w", encoding="utf-8") as fh:
            for i in tqdm(range(start, start + num_edits), desc="edits",
                          disable=not show_progress):
                edit = world.edit(i)
                src, tgt = f"edits/{i:07d}_source.png", f"edits/{i:07d}_target.png"
                Image.fromarray(render(edit.source)).save(out / src)
                Image.fromarray(render(edit.target)).save(out / tgt)
                fh.write(json.dumps({"source": src, "instruction": edit.instruction,
                                     "target": tgt, "kind": edit.kind}) + "\n")
    prompts = write_prompts(shapes_prompt_set(world, start=start),
                            out / "evaluation_metadata.jsonl")
    return {"images": num_images, "edits": num_edits, "prompts": sum(1 for _ in prompts.open())}
