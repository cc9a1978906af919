"""What scripts/sample.py does, for either family: prompts in, PNG grids and captions out."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fusion.api import FusionPipeline
from fusion.config import resolve_path
from fusion.data.images import fit, save_grid, to_rgb, to_tensor, to_uint8
from fusion.data.prompts import read_prompts
from fusion.data.sources import ShapesSource
from fusion.distributed import check_split, is_first_process, map_split
from fusion.errors import UserError
from fusion.eval.interleaved import InterleavedEvalConfig, story_prompts
from fusion.jobs.interleaved import write_interleaved
from fusion.sampling.base import (
    check_overflow_setting,
    encode_prompts,
    fit_prompts,
    image_settings,
)
from fusion.sampling.interleaved import generate_documents
from fusion.sampling.text import TokenSampling

TASKS = ("text_to_image", "image_to_text", "text_to_text", "interleaved")
# max_new_tokens when not given: a caption or a text continuation; a whole interleaved document
DEFAULT_NEW_TOKENS = {"interleaved": 96}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_prompt_list(cfg) -> list[str]:
    """The prompts of ``prompt_file`` or ``prompts``; at least one per process."""
    prompts = _prompt_list(cfg)
    check_split(len(prompts), "prompt(s)")
    return prompts


def _prompt_list(cfg) -> list[str]:
    if cfg.prompt_file:
        path = resolve_path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file={cfg.prompt_file}: no such file")
        if path.suffix == ".jsonl":
            prompts = [p.prompt for p in read_prompts(path)]
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompt_file={cfg.prompt_file} holds no prompts; pass a file with "
                            "one prompt per line (or a GenEval metadata .jsonl)")
        return prompts
    return list(cfg.prompts or cfg.sampling.prompts)


def geneval_prompts(cfg) -> list | None:
    """The prompt records of a GenEval metadata ``prompt_file`` (.jsonl), else None."""
    if cfg.prompt_file and Path(str(cfg.prompt_file)).suffix == ".jsonl":
        return read_prompts(resolve_path(cfg.prompt_file))
    return None


def write_images(out: Path, images: list[np.ndarray], prompts: list[str],
                 seeds: list[int]) -> list[dict]:
    """One PNG per image in ``<out>/images/NNNNN.png``; returns a record per image naming its
    file, prompt and the seed of the batch it was drawn in (same seed, settings and batch:
    the same image), for FID or a user's own tools."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
        name = f"{k:05d}.png"
        Image.fromarray(image).save(folder / name)
        records.append({"file": f"images/{name}", "prompt": prompt, "seed": seed})
    return records


def read_image_folder(folder, size: int) -> tuple[list[np.ndarray], list[str], list[dict]]:
    """The images of ``folder`` (sorted by name) as uint8 (size, size, 3), their names, and
    one {"image", "skipped"} record per file that is not a readable image (truncated,
    corrupt, not an image at all), which is left out with one warning. A folder with no
    readable image at all is a :class:`UserError`."""
    path = resolve_path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"images={folder}: no such folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"images={folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    arrays, names, skipped = [], [], []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()  # decodes fully: a truncated file fails here, not mid-batch
                arrays.append(np.asarray(fit(to_rgb(img), size)))
            names.append(f.name)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            skipped.append({"image": f.name, "skipped": str(err)})
    if not arrays:
        raise UserError(f"none of the {len(files)} image files in images={folder} is readable "
                        f"(first: {skipped[0]['image']}: {skipped[0]['skipped']}); pass a "
                        "folder of PNG, JPEG or WebP images")
    if skipped:
        log.warning("skipped %d of %d image files in %s that are not readable images: %s",
                    len(skipped), len(files), folder,
                    ", ".join(r["image"] for r in skipped[:20])
                    + (" ..." if len(skipped) > 20 else ""))
    return arrays, names, skipped


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_sampling(cfg, explicit_sampling: Iterable[str] = ()) -> dict:
    """The model folder is loaded as :class:`fusion.FusionPipeline` loads it (one loading
    path: the same model, tokenizers and sampler, so the same images for the same settings
    and seed). ``explicit_sampling``: the ``sampling.*`` settings given on the command line;
    the others follow the model's recorded recipe where it has one
    (FusionPipeline.sampling_settings)."""
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task} is not a task; pass task= one of {', '.join(TASKS)}")
    overflow = check_overflow_setting(cfg.sampling.prompt_overflow)
    device = pick_device(cfg.device)
    pipe = FusionPipeline.from_pretrained(resolve_path(cfg.model_dir), device=device)
    sampler, tok, meta = pipe.sampler, pipe.tokenizer, pipe.meta
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s, taken = pipe.sampling_settings(cfg.sampling, explicit_sampling)
    if taken:
        print("sampling as the model's recipe: "
              + ", ".join(f"{k}={v}" for k, v in taken.items()))
    token_sampling = TokenSampling.from_config(s)
    max_new_tokens = cfg.max_new_tokens or DEFAULT_NEW_TOKENS.get(cfg.task, 24)
    # Prompts are checked against the model's length before any model call; a sampler
    # without a budget (a test double) leaves them unchecked.
    budget = getattr(sampler, "prompt_budget", None)
    records, skipped = [], []
    # Under torchrun every rank draws its share of the batches (fusion.distributed); rank 0
    # writes the files and reports.
    writes = is_first_process()
    result = {"task": cfg.task, "count": 0, "output_dir": str(out)}
    if cfg.task == "text_to_image":
        texts = read_prompt_list(cfg)
        ids = encode_prompts(tok, texts, budget and budget("text_to_image"), overflow)
        prompts = [p for p in texts for _ in range(cfg.images_per_prompt)]
        prompt_ids = [x for x in ids for _ in range(cfg.images_per_prompt)]
        batches = list(_batches(prompt_ids, cfg.batch_size))
        drawn = map_split(lambda i, batch: list(to_uint8(sampler.generate_images(
            batch, **image_settings(s, seed=s.seed + i)))), batches, "text->image")
        images = sum(drawn, [])
        seeds = [s.seed + i for i, batch in enumerate(batches) for _ in batch]
        if not writes:
            return result
        save_grid(images, out / "text_to_image.png", prompts)
        records = write_images(out, images, prompts, seeds)
        if geneval_prompts(cfg):  # GenEval's own layout too, for its scorer and ours
            from fusion.eval.geneval import write_geneval_folder

            n = cfg.images_per_prompt
            write_geneval_folder(out / "geneval", geneval_prompts(cfg),
                                 [images[k * n:(k + 1) * n] for k in range(len(texts))],
                                 overwrite=True)
    elif cfg.task == "image_to_text":
        if budget:  # no prompt, but the image and max_new_tokens must fit
            fit_prompts([], budget("image_to_text", max_new_tokens))
        if cfg.images:
            arrays, names, skipped = read_image_folder(cfg.images, meta["image_size"])
        else:  # held-out ShapesWorld scenes
            src = ShapesSource(cfg.num_images, size=meta["image_size"], offset=10**6)
            arrays = [src[i].image for i in range(len(src))]
            names = [src[i].key for i in range(len(src))]
        check_split(len(arrays), "image(s)")
        captions = sum(map_split(lambda _, batch: [tok.decode(x) for x in sampler.caption(
            torch.stack([to_tensor(a) for a in batch]).to(device), max_new_tokens,
            TokenSampling(0.0))], list(_batches(arrays, cfg.batch_size)),
            "image->text"), [])
        if not writes:
            return result
        save_grid(arrays, out / "image_to_text.png", captions)
        records = [{"image": n, "caption": c} for n, c in zip(names, captions, strict=True)]
    elif cfg.task == "interleaved":
        prompts = (read_prompt_list(cfg) if cfg.prompts or cfg.prompt_file
                   else story_prompts(InterleavedEvalConfig(num_prompts=8), meta["image_size"]))
        docs, stops = generate_documents(sampler, tok, prompts, s, max_new_tokens,
                                         cfg.max_images)
        docs = [[x if isinstance(x, str) else to_uint8(x) for x in doc] for doc in docs]
        if not writes:
            return result
        page, records = write_interleaved(out, prompts, docs, stops)
        print(f"wrote {page}")
    else:
        prompts = read_prompt_list(cfg)
        ids = encode_prompts(tok, prompts, budget and budget("text_to_text", max_new_tokens),
                             overflow)
        continued = map_split(lambda _, batch_ids: [tok.decode(x) for x in sampler.generate_text(
            batch_ids, max_new_tokens, token_sampling, seed=s.seed)],
            list(_batches(ids, cfg.batch_size)), "text->text")
        if not writes:
            return result
        records = [{"prompt": p, "continuation": c}
                   for p, c in zip(prompts, sum(continued, []), strict=True)]
    # unreadable images are listed too, each with why it was skipped
    (out / f"{cfg.task}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records + skipped))
    result["count"] = len(records)
    if cfg.task == "image_to_text":
        result["skipped"] = len(skipped)
    return result
