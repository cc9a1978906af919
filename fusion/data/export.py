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


# --------------------------------------------------------------------------------------------
# Shards (fusion.data.shards reads them)
# --------------------------------------------------------------------------------------------
def _folder_samples(root: Path, edits: bool):
    """Samples of a users' folder, the image files' bytes as they are (not re-encoded):
    captions.jsonl -> ``<image ext>`` + ``txt``; edits.jsonl -> ``source.<ext>`` +
    ``target.<ext>`` + ``txt`` (the instruction). Malformed rows and rows naming a missing
    file or without their text are skipped and counted."""
    index = root / ("edits.jsonl" if edits else "captions.jsonl")
    if not index.is_file():
        raise FileNotFoundError(f"index file not found: {index}")
    fields = ("source", "target") if edits else ("file",)
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):  # a malformed line: skipped and counted, as folders are
            yield None, f"{index.name}:{n}"
            continue
        text = row.get("instruction" if edits else "caption")
        paths = [root / str(row.get(f, "")) for f in fields]
        if not isinstance(text, str) or not all(p.is_file() for p in paths):
            yield None, f"{index.name}:{n}"
            continue
        sample = {"__key__": f"{n:09d}", "txt": text.strip()}
        for name, path in zip(fields, paths, strict=True):
            ext = path.suffix.lstrip(".").lower() or "png"
            sample[ext if name == "file" else f"{name}.{ext}"] = path.read_bytes()
        yield sample, None


def _shapes_samples(num_images: int, seed: int, size: int, start: int):
    import io

    source = ShapesSource(num_images, seed=seed, size=size, offset=start)
    for i in range(num_images):
        rec = source[i]
        buf = io.BytesIO()
        Image.fromarray(rec.image).save(buf, format="PNG")
        yield {"__key__": f"{start + i:09d}", "png": buf.getvalue(), "txt": rec.caption,
               "json": json.dumps({"caption": rec.caption,
                                   "description": rec.description})}, None


def write_shards(out_dir: str | Path, shard_size: int, folder: str | Path | None = None,
                 edits: bool = False, num_images: int = 0, seed: int = 0, size: int = 64,
                 start: int = 0, show_progress: bool = True) -> dict:
    """Tar shards of ``shard_size`` samples (``out_dir/00000.tar`` ...) with webdataset's
    ``ShardWriter``, from a users' ``folder`` (its captions.jsonl, or edits.jsonl with
    ``edits``) or from ``num_images`` ShapesWorld scenes. Returns the counts."""
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be 1 or more, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards; write to an empty folder")
    samples = (_folder_samples(Path(folder), edits) if folder is not None
               else _shapes_samples(num_images, seed, size, start))
    written, skipped = 0, []
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample, bad in tqdm(samples, desc="samples", disable=not show_progress):
            if sample is None:
                skipped.append(bad)
                continue
            sink.write(sample)
            written += 1
    if not written:
        raise ValueError(f"no sample written to {out} ({len(skipped)} skipped)")
    return {"samples": written, "skipped": skipped, "shards": len(list(out.glob("*.tar")))}
