"""``scripts/edit.py``: edit images with a fine-tuned model folder (either family), one image
or a batch of triplets, sampled with the settings the model folder recorded."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fusion.api import FusionPipeline
from fusion.config import SamplingConfig, resolve_path, to_dataclass
from fusion.data.images import fit, save_grid, to_rgb, to_tensor
from fusion.errors import UserError
from fusion.eval.editing import psnr
from fusion.jobs.sample import pick_device
from fusion.sampling.edit import edit_images


@dataclass
class EditConfig:
    """``scripts/edit.py``: edit images with a fine-tuned model folder (either family)."""

    model_dir: str = "outputs/train/edit_transfusion_tiny/model"
    # Single edit: one source image file and its instruction ...
    image: str | None = None
    instruction: str | None = None
    # ... or a batch: a triplet file ({"source", "instruction", "target"} per line, paths
    # relative to it; the folder format of fusion.data.sources.EditFolder) or its folder.
    edits: str | None = None
    output_dir: str = "outputs/edits"
    resize: str = "center_crop"  # how a source of another size is brought to the model's
    max_bad_share: float = 0.1  # batch: refuse a triplet file with more bad rows than this
    batch_size: int = 16
    device: str = "auto"  # auto | cpu | cuda
    # scripts/edit.py samples with the settings the model folder recorded from its recipe
    # (e.g. the edit recipe's image_guidance_scale, Chameleon's top_k); a sampling.* key given
    # on the command line replaces the recorded one.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def register_edit_config() -> None:
    """Put :class:`EditConfig` in Hydra's ConfigStore as ``edit_schema`` (conf/edit.yaml)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="edit_schema", node=EditConfig)


def read_source_image(path: str | Path, size: int, resize: str = "center_crop") -> np.ndarray:
    """One source image file -> uint8 (size, size, 3), with a clear error for bad input."""
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    try:
        with Image.open(p) as img:
            img.load()  # decodes fully: a truncated file fails here
            return np.asarray(fit(to_rgb(img), size, resize))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise UserError(f"image={path} is not a readable image ({err}); pass a PNG, JPEG or "
                        "WebP file") from err


def _edit_folder(path: str, size: int, resize: str, max_bad_share: float):
    from fusion.data.sources import EditFolder

    p = resolve_path(path)
    if p.is_file():
        return EditFolder(p.parent, size=size, resize=resize, max_bad_share=max_bad_share,
                          index_name=p.name)
    if p.is_dir():
        return EditFolder(p, size=size, resize=resize, max_bad_share=max_bad_share)
    raise FileNotFoundError(f"edits file or folder not found: {path}")


def run_editing(cfg, given: Collection[str] | None = None) -> dict:
    """Single mode writes ``<output_dir>/edited.png``; batch mode ``<output_dir>/NNNNN.png``
    per triplet, ``edits.png`` (source | edited | target, captioned) and PSNR against the
    targets. Both write ``edits.jsonl``.

    ``given``: the ``cfg.sampling`` keys set on purpose (scripts/edit.py passes those on its
    command line); every other key takes the value the model folder recorded from its recipe.
    None: use ``cfg.sampling`` as it is. The settings used are returned under "sampling"."""

    single = cfg.image is not None or cfg.instruction is not None
    if single and cfg.edits:
        raise UserError("give image= and instruction= (one edit) or edits= (a batch), not both")
    if not single and not cfg.edits:
        raise UserError("nothing to edit: give image=<file> instruction='...' or "
                        "edits=<triplet .jsonl or folder>")
    if single and (not cfg.image or not (cfg.instruction or "").strip()):
        raise UserError("a single edit needs both image=<file> and a non-empty "
                        "instruction='...'")
    pipe = FusionPipeline.from_pretrained(resolve_path(cfg.model_dir))  # on the CPU for now
    sampling = to_dataclass(cfg.sampling, SamplingConfig)
    if given is not None:
        unknown = set(given) - {f.name for f in fields(SamplingConfig)}
        if unknown:
            raise UserError(f"unknown sampling keys {sorted(unknown)}; the keys are those of "
                            "SamplingConfig (fusion.config)")
        sampling, _ = pipe.sampling_settings(sampling, given)
    size = pipe.meta["image_size"]
    if single:  # check the input before the model goes to the device
        arrays, instructions = [read_source_image(cfg.image, size, cfg.resize)], [
            cfg.instruction.strip()]
        targets, names = None, [str(cfg.image)]
    else:
        folder = _edit_folder(cfg.edits, size, cfg.resize, cfg.max_bad_share)
        records = [folder[i] for i in range(len(folder))]
        arrays = [r.source for r in records]
        instructions = [r.instruction for r in records]
        targets = np.stack([r.target for r in records])
        names = [r.key for r in records]
    pipe.to(pick_device(cfg.device))
    sources = torch.stack([to_tensor(a) for a in arrays])
    edited = edit_images(pipe.sampler, pipe.tokenizer, sources, instructions, sampling,
                         cfg.batch_size)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records_out = []
    if single:
        Image.fromarray(edited[0]).save(out / "edited.png")
        records_out.append({"source": names[0], "instruction": instructions[0],
                            "output": str(out / "edited.png")})
        result = {"count": 1, "output": str(out / "edited.png")}
    else:
        for i, img in enumerate(edited):
            Image.fromarray(img).save(out / f"{i:05d}.png")
        db = psnr(targets, edited)
        cells = [np.concatenate([a, e, t], axis=1)
                 for a, e, t in zip(arrays, edited, targets, strict=True)]
        save_grid(cells[:64], out / "edits.png", instructions[:64], columns=4)
        records_out = [{"source": n, "instruction": t, "output": str(out / f"{i:05d}.png"),
                        "psnr": float(p)}
                       for i, (n, t, p) in enumerate(zip(names, instructions, db, strict=True))]
        result = {"count": len(edited), "psnr": float(np.mean(db)),
                  "output": str(out / "edits.png")}
    (out / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records_out))
    result["sampling"] = {f.name: getattr(sampling, f.name) for f in fields(SamplingConfig)
                          if f.name != "prompts"}
    return result
