"""What scripts/sample.py does, for either family: prompts in, PNG grids and captions out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from fusion.config import resolve_path
from fusion.data.images import fit, save_grid, to_rgb, to_tensor, to_uint8
from fusion.data.prompts import read_prompts
from fusion.data.sources import ShapesSource
from fusion.sampling.text import TokenSampling
from fusion.training.build import load_model
from fusion.training.samplers import family_sampler

TASKS = ("text_to_image", "image_to_text", "text_to_text")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_prompt_list(cfg) -> list[str]:
    if cfg.prompt_file:
        path = resolve_path(cfg.prompt_file)
        if path.suffix == ".jsonl":
            return [p.prompt for p in read_prompts(path)]
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(cfg.prompts or cfg.sampling.prompts)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def resolve_sampling(sampling, recorded: dict, explicit: Iterable[str] = ()) -> tuple:
    """The settings to sample with: ``sampling`` (the config) where each setting the model
    recorded from its training recipe (config.json "sampling", e.g. Chameleon's top-k 64) is
    taken from the model, unless ``explicit`` names it (set on the command line).
    Returns (settings, {setting: value taken from the model})."""
    taken = {k: v for k, v in recorded.items() if k in sampling and k not in set(explicit)}
    return OmegaConf.merge(sampling, taken), taken


def run_sampling(cfg, explicit_sampling: Iterable[str] = ()) -> dict:
    """``explicit_sampling``: the ``sampling.*`` settings given on the command line; the
    others follow the model's recorded recipe where it has one (:func:`resolve_sampling`)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; expected one of {TASKS}")
    device = pick_device(cfg.device)
    model, loss, tok, image_tok, meta = load_model(resolve_path(cfg.model_dir))
    model.to(device), image_tok.to(device)
    sampler = family_sampler(model, loss, tok, image_tok)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    s, taken = resolve_sampling(cfg.sampling, meta.get("sampling") or {}, explicit_sampling)
    if taken:
        print("sampling as the model's recipe: "
              + ", ".join(f"{k}={v}" for k, v in taken.items()))
    token_sampling = TokenSampling.from_config(s)
    records = []
    if cfg.task == "text_to_image":
        prompts = [p for p in read_prompt_list(cfg) for _ in range(cfg.images_per_prompt)]
        images = []
        for i, batch in enumerate(tqdm(list(_batches(prompts, cfg.batch_size)),
                                       desc="text->image")):
            pixels = sampler.generate_images([tok.encode(p) for p in batch],
                                             guidance_scale=s.guidance_scale,
                                             steps=s.diffusion_steps, seed=s.seed + i,
                                             sampling=token_sampling)
            images += list(to_uint8(pixels))
        save_grid(images, out / "text_to_image.png", prompts)
        records = [{"prompt": p} for p in prompts]
    elif cfg.task == "image_to_text":
        if cfg.images:
            files = sorted(p for p in Path(resolve_path(cfg.images)).iterdir()
                           if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if not files:
                raise FileNotFoundError(f"no images in {cfg.images}")
            arrays = [np.asarray(fit(to_rgb(Image.open(f)), meta["image_size"])) for f in files]
            names = [f.name for f in files]
        else:  # held-out ShapesWorld scenes
            src = ShapesSource(cfg.num_images, size=meta["image_size"], offset=10**6)
            arrays = [src[i].image for i in range(len(src))]
            names = [src[i].key for i in range(len(src))]
        captions = []
        for batch in tqdm(list(_batches(arrays, cfg.batch_size)), desc="image->text"):
            pixels = torch.stack([to_tensor(a) for a in batch]).to(device)
            ids = sampler.caption(pixels, cfg.max_new_tokens, TokenSampling(0.0))
            captions += [tok.decode(x) for x in ids]
        save_grid(arrays, out / "image_to_text.png", captions)
        records = [{"image": n, "caption": c} for n, c in zip(names, captions, strict=True)]
    else:
        prompts = read_prompt_list(cfg)
        for batch in _batches(prompts, cfg.batch_size):
            ids = sampler.generate_text([tok.encode(p) for p in batch], cfg.max_new_tokens,
                                        token_sampling, seed=s.seed)
            records += [{"prompt": p, "continuation": tok.decode(x)}
                        for p, x in zip(batch, ids, strict=True)]
    (out / f"{cfg.task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"task": cfg.task, "count": len(records), "output_dir": str(out)}
