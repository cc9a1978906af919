"""The main job (README line 1) as a chain of stages that reuse finished work.

Each stage writes its outputs under the run's output folder and records a fingerprint of the
config that produced them in ``stages.json``; a re-run skips a stage whose fingerprint and
outputs are unchanged, so a second run of the demo is fast and an edited config redoes only
what it touches.

Stages: text tokenizer -> ShapesWorld preview + detector check -> image tokenizer (reused
when its artifact exists) -> family model (scripts/train.py; resumes an interrupted run) ->
sampling + evaluation (GenEval-shapes, FID-shapes, captioning) -> image-editing fine-tune + edit
accuracy (optional, ``demo.edit_steps``) -> results.md / results.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fusion.config import CONF_DIR, resolve_path
from fusion.data.images import save_grid
from fusion.data.shapes import ShapesWorld, detect, scene_matches
from fusion.data.sources import ShapesSource
from fusion.data.text import train_shapes_tokenizer

log = logging.getLogger(__name__)
REPO = CONF_DIR.parent


class StageRunner:
    """Runs named stages once per config fingerprint; results land in ``stages.json``."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.record_path = self.out / "stages.json"
        self.records: dict = (json.loads(self.record_path.read_text())
                              if self.record_path.exists() else {})

    def run(self, name: str, config: object, outputs: list[Path],
            fn: Callable[[], dict]) -> dict:
        plain = OmegaConf.to_container(config, resolve=True) if isinstance(
            config, DictConfig) else config
        fingerprint = hashlib.sha256(json.dumps(plain, sort_keys=True,
                                                default=str).encode()).hexdigest()[:16]
        prev = self.records.get(name)
        if prev and prev["fingerprint"] == fingerprint and all(p.exists() for p in outputs):
            print(f"[{name}] reused ({prev['summary']})", flush=True)
            return prev["result"]
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        summary = result.pop("summary", "done")
        self.records[name] = {"fingerprint": fingerprint, "result": result, "summary": summary,
                              "seconds": round(seconds, 2)}
        self.record_path.write_text(json.dumps(self.records, indent=2) + "\n")
        print(f"[{name}] {summary} ({seconds:.1f} s)", flush=True)
        return result


FAMILY_TOKENIZERS = {"transfusion": "tokenizers/shapes-vae", "chameleon": "tokenizers/shapes-vqgan"}
FAMILY_TOKENIZER_CONFIGS = {"transfusion": "vae_tiny", "chameleon": "vqgan_tiny"}


def _script(name: str, overrides: list[str]) -> None:
    """Run one of the stage entry points (scripts/<name>.py) as its own process, so that each
    stage is exactly what a user would run by hand; its progress bars stream through."""
    cmd = [sys.executable, str(REPO / "scripts" / f"{name}.py"), *overrides]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def _recorded(model_dir: Path) -> dict | None:
    """A model folder's recorded recipe sampling (config.json), for a stage's fingerprint."""
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    return meta.get("sampling")


def run_demo(cfg: DictConfig, debug: str | None = None) -> dict:
    """The main job; ``debug`` is the demo's own ``debug`` choice, passed on to each stage."""
    out = Path(cfg.output_dir)
    stages = StageRunner(out)
    data, demo, family = cfg.data, cfg.demo, cfg.family
    if family not in FAMILY_TOKENIZERS:
        raise ValueError(f"unknown family {family!r}; expected one of {list(FAMILY_TOKENIZERS)}")
    debug_args = [f"debug={debug}"] if debug else []

    tok_dir = out / "text_tokenizer"

    def text_tokenizer() -> dict:
        tok, path = train_shapes_tokenizer(tok_dir, cfg.text_tokenizer.vocab_size,
                                           cfg.text_tokenizer.num_scenes, data.seed,
                                           cfg.text_tokenizer.min_frequency)
        example = "a photo of a red circle left of a blue square"
        n_tokens = len(tok.encode(example))
        return {"vocab_size": tok.vocab_size, "path": str(path),
                "tokens_in_example": n_tokens,
                "summary": f"BPE vocab {tok.vocab_size}; {n_tokens} tokens for {example!r}"}

    tok_result = stages.run("text_tokenizer", {"tok": cfg.text_tokenizer, "seed": data.seed},
                            [tok_dir / "tokenizer.json"], text_tokenizer)

    grid_path = out / "shapes_grid.png"

    def preview() -> dict:
        # Held-out scenes, shown with the caption a model would be trained on.
        source = ShapesSource(demo.grid_images, seed=data.seed, size=data.image_size,
                              offset=data.num_train)
        records = [source[i] for i in range(len(source))]
        save_grid([r.image for r in records], grid_path, [r.caption for r in records],
                  columns=demo.grid_columns)
        return {"images": len(records), "path": str(grid_path),
                "summary": f"{len(records)} held-out scenes with captions -> {grid_path}"}

    stages.run("shapes_preview", {"demo": demo.grid_images, "data": data}, [grid_path], preview)

    def detector_check() -> dict:
        world = ShapesWorld(seed=data.seed, size=data.image_size)
        n = demo.detector_check_scenes
        ok = sum(scene_matches(world.scene(i), detect(world.image(i)))
                 for i in tqdm(range(data.num_train, data.num_train + n), desc="detector check",
                               leave=False))
        return {"scenes": n, "exact_recovery": ok / n,
                "summary": f"detector recovered {ok}/{n} held-out scenes exactly"}

    det = stages.run("detector_check", {"n": demo.detector_check_scenes, "data": data}, [],
                     detector_check)

    # Stage 1: the image tokenizer (reused when its artifact exists, e.g. the shipped one).
    image_tok = resolve_path(demo.image_tokenizer or FAMILY_TOKENIZERS[family])

    def image_tokenizer() -> dict:
        if (image_tok / "config.json").exists():
            return {"path": str(image_tok), "trained": False,
                    "summary": f"using the artifact in {image_tok}"}
        _script("train_tokenizer", [f"tokenizer={FAMILY_TOKENIZER_CONFIGS[family]}",
                                    f"tokenizer.artifact_dir={image_tok}",
                                    f"output_dir={out / 'image_tokenizer'}", *debug_args,
                                    *demo.tokenizer_overrides])
        return {"path": str(image_tok), "trained": True,
                "summary": f"trained and saved to {image_tok}"}

    stages.run("image_tokenizer", {"path": str(image_tok), "over": demo.tokenizer_overrides,
                                   "debug": debug}, [image_tok / "config.json"], image_tokenizer)

    # Stage 2: the family model (resumes from its last checkpoint if interrupted).
    run_dir = out / family
    model_dir = run_dir / "model"

    def train() -> dict:
        # In debug mode the debug config's step count applies, not demo.train_steps.
        steps = [] if debug else [f"trainer.max_steps={demo.train_steps}"]
        _script("train", [f"experiment={family}_tiny", f"output_dir={run_dir}",
                          f"image_tokenizer={image_tok}", *steps,
                          f"data.text_tokenizer={tok_dir / 'tokenizer.json'}",
                          f"logger={cfg.logger.kind}", *debug_args, *demo.train_overrides])
        meta = json.loads((model_dir / "config.json").read_text())
        return {"steps": meta["steps"], "path": str(model_dir),
                "summary": f"{family} trained for {meta['steps']} steps -> {model_dir}"}

    trained = stages.run("train", {"family": family, "steps": demo.train_steps,
                                   "over": demo.train_overrides, "debug": debug,
                                   "tokenizer": str(image_tok), "bpe": tok_result["vocab_size"]},
                         [model_dir / "model.safetensors"], train)

    # Stage 3: sample and evaluate (GenEval-shapes, FID-shapes, captioning).
    eval_path = out / "eval.json"

    def evaluate() -> dict:
        from fusion.eval.model import ModelEvalConfig, evaluate_model
        from fusion.families import family_sampler
        from fusion.families.folders import load_model, recorded_sampling

        model, loss, tok, itok, meta = load_model(model_dir)
        sampler = family_sampler(model, loss, tok, itok)
        # Sampled the way the recipe says (config.json "sampling"), as scripts/evaluate.py does.
        ecfg = ModelEvalConfig(images_per_tag=demo.eval_images_per_tag,
                               caption_images=demo.eval_caption_images, seed=cfg.seed,
                               **{k: v for k, v in recorded_sampling(meta).items()
                                  if k != "image_guidance_scale"})  # an editing setting
        res = evaluate_model(sampler, tok, meta["image_size"], ecfg, world_seed=data.seed,
                             grid_path=out / "samples.png")
        eval_path.write_text(json.dumps(res, indent=2) + "\n")
        return {**res, "summary": f"GenEval-shapes {res['geneval_overall']:.3f}, "
                                  f"FID-shapes {res.get('fid_shapes', float('nan')):.2f}, "
                                  f"captions {res['caption_single_object_accuracy']:.2f}"}

    ev = stages.run("evaluate", {"eval": [demo.eval_images_per_tag, demo.eval_caption_images],
                                 "sampling": _recorded(model_dir), "model": trained},
                    [eval_path], evaluate)

    # Stage 4: image editing -- a short fine-tune of the stage-2 model on ShapesWorld edits,
    # then a few held-out edits of each kind, scored (docs/editing.md).
    edit = {}
    if demo.edit_steps > 0:
        edit_dir = out / f"edit_{family}"
        edit_model = edit_dir / "model"
        edit_eval = out / "edit_eval.json"

        def edit_finetune() -> dict:
            steps = [] if debug else [f"trainer.max_steps={demo.edit_steps}"]
            _script("train", [f"experiment=edit_{family}_tiny", f"output_dir={edit_dir}",
                              f"init_from={model_dir}", f"image_tokenizer={image_tok}",
                              f"data.text_tokenizer={tok_dir / 'tokenizer.json'}",
                              f"logger={cfg.logger.kind}", *steps, *debug_args,
                              *demo.edit_overrides])
            meta = json.loads((edit_model / "config.json").read_text())
            return {"steps": meta["steps"], "path": str(edit_model),
                    "summary": f"edit fine-tune: {meta['steps']} steps -> {edit_model}"}

        tuned = stages.run("edit_finetune", {"steps": demo.edit_steps, "model": trained,
                                             "over": demo.edit_overrides, "debug": debug},
                           [edit_model / "model.safetensors"], edit_finetune)

        def edit_evaluate() -> dict:
            from fusion.eval.editing import EditEvalConfig, evaluate_editing
            from fusion.families import family_sampler
            from fusion.families.folders import load_model, recorded_sampling

            model, loss, tok, itok, meta = load_model(edit_model)
            s = recorded_sampling(meta)  # the edit recipe's, as scripts/evaluate.py uses
            ecfg = EditEvalConfig(per_kind=demo.edit_per_kind,
                                  guidance_scale=s["guidance_scale"],
                                  image_guidance_scale=s["image_guidance_scale"],
                                  diffusion_steps=s["diffusion_steps"],
                                  temperature=s["temperature"], top_k=s["top_k"],
                                  seed=cfg.seed)
            res = evaluate_editing(family_sampler(model, loss, tok, itok), tok,
                                   meta["image_size"], ecfg, world_seed=data.seed,
                                   grid_path=out / "edits.png")
            res.pop("results", None)
            edit_eval.write_text(json.dumps(res, indent=2) + "\n")
            return {**res, "summary": f"edit accuracy {res['edit_accuracy']:.3f} over "
                                      f"{res['edits']} held-out edits -> {out / 'edits.png'}"}

        edit = stages.run("edit_evaluate", {"per_kind": demo.edit_per_kind, "model": tuned,
                                            "sampling": _recorded(edit_model)},
                          [edit_eval], edit_evaluate)

    results = {"family": family, "train_steps": trained["steps"],
               "text_tokenizer_vocab": tok_result["vocab_size"],
               "detector_exact_recovery": det["exact_recovery"],
               **{k: v for k, v in ev.items() if isinstance(v, int | float)}}
    if edit:
        results["edit_accuracy"] = edit["edit_accuracy"]
        results.update({f"edit_accuracy_{kind}": edit[kind]["accuracy"]
                        for kind in ("recolor", "move", "add", "remove") if kind in edit})
        results["edit_psnr"] = edit["psnr"]
    write_results(out, results)
    return results


def write_results(out: Path, results: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in results.items())
    table = f"| metric | value |\n|---|---|\n{rows}\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return table
