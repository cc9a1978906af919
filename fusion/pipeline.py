"""The main job (README line 1) as a chain of stages that reuse finished work.

Each stage writes its outputs under the run's output folder and records a fingerprint of the
config that produced them in ``stages.json``; a re-run skips a stage whose fingerprint and
outputs are unchanged, so a second run of the demo is fast and an edited config redoes only
what it touches.

Stages: text tokenizer -> ShapesWorld preview + detector check -> image tokenizer (reused
when its artifact exists) -> family model (scripts/train.py; resumes an interrupted run) ->
sampling + evaluation (GenEval-shapes, FID-shapes, captioning) -> image-editing fine-tune + edit
accuracy (off by default; ``demo.edit_steps=N`` turns it on) -> results.md / results.json, each
score printed beside the best figure docs/ records for it (docs/best_results.json).
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


def run_script(name: str, overrides: list[str], torchrun: int = 1) -> None:
    """Run one of the stage entry points (scripts/<name>.py) as its own process, so that each
    stage is exactly what a user would run by hand; its progress bars stream through.
    ``torchrun`` > 1: that many processes, started by torchrun on this node."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={torchrun}"] if torchrun > 1 else [sys.executable])
    cmd = [*launcher, str(REPO / "scripts" / f"{name}.py"), *overrides]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def _recorded(model_dir: Path) -> dict | None:
    """A model folder's recorded recipe sampling (config.json), for a stage's fingerprint."""
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    return meta.get("sampling")


def run_demo(cfg: DictConfig, debug: str | None = None) -> dict:
    """The main job; ``debug`` is the demo's own ``debug`` choice, passed on to each stage."""
    job = MainJob(cfg, debug)
    bpe = job.text_tokenizer()
    job.preview()
    detector = job.detector_check()
    job.image_tokenizer()  # stage 1
    trained = job.train(bpe)  # stage 2
    scores = job.evaluate(trained)  # stage 3
    edits = job.edit(trained) if cfg.demo.edit_steps > 0 else {}  # stage 4
    return job.write_results(bpe, detector, trained, scores, edits)


class MainJob:
    """The main job's stages, each run through :class:`StageRunner` (reused when its config
    fingerprint and outputs are unchanged). Paths of every stage's outputs live here."""

    def __init__(self, cfg: DictConfig, debug: str | None = None):
        from fusion.families import get as get_family

        self.cfg, self.debug = cfg, debug
        self.data, self.demo, self.family = cfg.data, cfg.demo, cfg.family
        family = get_family(self.family)  # an unknown family fails here, naming the known ones
        self.out = Path(cfg.output_dir)
        self.stages = StageRunner(self.out)
        self.debug_args = [f"debug={debug}"] if debug else []
        self.tok_dir = self.out / "text_tokenizer"
        # Stage 1: the family's image tokenizer kind, trained from tokenizer/<kind>_tiny when
        # the artifact is missing (the shipped ones are in tokenizers/).
        self.image_tok = resolve_path(self.demo.image_tokenizer or family.default_image_tokenizer)
        self.tokenizer_config = f"{family.image_tokenizer_kind}_tiny"
        self.run_dir = self.out / self.family
        self.model_dir = self.run_dir / "model"
        self.edit_dir = self.out / f"edit_{self.family}"
        # training stages: the demo's accelerator; several processes train with DDP
        processes = self.demo.processes
        if processes < 1:
            from fusion.errors import UserError

            raise UserError(f"demo.processes must be 1 or more, got {processes}")
        self.devices = [f"trainer.accelerator={cfg.trainer.accelerator}",
                        f"trainer.devices={processes}",
                        *(["trainer.strategy=ddp"] if processes > 1 else [])]

    # -- text and data --------------------------------------------------------------------
    def text_tokenizer(self) -> dict:
        return self.stages.run("text_tokenizer", {"tok": self.cfg.text_tokenizer,
                                                  "seed": self.data.seed},
                               [self.tok_dir / "tokenizer.json"], self._train_text_tokenizer)

    def _train_text_tokenizer(self) -> dict:
        t = self.cfg.text_tokenizer
        tok, path = train_shapes_tokenizer(self.tok_dir, t.vocab_size, t.num_scenes,
                                           self.data.seed, t.min_frequency)
        example = "a photo of a red circle left of a blue square"
        n_tokens = len(tok.encode(example))
        return {"vocab_size": tok.vocab_size, "path": str(path), "tokens_in_example": n_tokens,
                "summary": f"BPE vocab {tok.vocab_size}; {n_tokens} tokens for {example!r}"}

    def preview(self) -> dict:
        path = self.out / "shapes_grid.png"
        return self.stages.run("shapes_preview", {"demo": self.demo.grid_images,
                                                  "data": self.data}, [path],
                               lambda: self._preview(path))

    def _preview(self, path: Path) -> dict:
        # Held-out scenes, shown with the caption a model would be trained on.
        source = ShapesSource(self.demo.grid_images, seed=self.data.seed,
                              size=self.data.image_size, offset=self.data.num_train)
        records = [source[i] for i in range(len(source))]
        save_grid([r.image for r in records], path, [r.caption for r in records],
                  columns=self.demo.grid_columns)
        return {"images": len(records), "path": str(path),
                "summary": f"{len(records)} held-out scenes with captions -> {path}"}

    def detector_check(self) -> dict:
        return self.stages.run("detector_check", {"n": self.demo.detector_check_scenes,
                                                  "data": self.data}, [], self._detector_check)

    def _detector_check(self) -> dict:
        world = ShapesWorld(seed=self.data.seed, size=self.data.image_size)
        n, start = self.demo.detector_check_scenes, self.data.num_train
        ok = sum(scene_matches(world.scene(i), detect(world.image(i)))
                 for i in tqdm(range(start, start + n), desc="detector check", leave=False))
        return {"scenes": n, "exact_recovery": ok / n,
                "summary": f"detector recovered {ok}/{n} held-out scenes exactly"}

    # -- stage 1: the image tokenizer (reused when its artifact exists) -------------------
    def image_tokenizer(self) -> dict:
        return self.stages.run("image_tokenizer", {"path": str(self.image_tok),
                                                   "over": self.demo.tokenizer_overrides,
                                                   "debug": self.debug},
                               [self.image_tok / "config.json"], self._image_tokenizer)

    def _image_tokenizer(self) -> dict:
        if (self.image_tok / "config.json").exists():
            return {"path": str(self.image_tok), "trained": False,
                    "summary": f"using the artifact in {self.image_tok}"}
        run_script("train_tokenizer", [f"tokenizer={self.tokenizer_config}",
                                    f"tokenizer.artifact_dir={self.image_tok}",
                                    f"output_dir={self.out / 'image_tokenizer'}",
                                    *self.debug_args, *self.demo.tokenizer_overrides])
        return {"path": str(self.image_tok), "trained": True,
                "summary": f"trained and saved to {self.image_tok}"}

    # -- stage 2: the family model (resumes an interrupted run) ---------------------------
    def train(self, bpe: dict) -> dict:
        return self.stages.run(
            "train", {"family": self.family, "steps": self.demo.train_steps,
                      "over": self.demo.train_overrides, "debug": self.debug,
                      "tokenizer": str(self.image_tok), "bpe": bpe["vocab_size"]},
            [self.model_dir / "model.safetensors"],
            lambda: self._train(f"{self.family}_tiny", self.run_dir, self.demo.train_steps,
                                self.demo.train_overrides))

    def _train(self, experiment: str, run_dir: Path, steps: int, overrides,
               extra: tuple[str, ...] = ()) -> dict:
        # In debug mode the debug config's step count applies, not the demo's.
        max_steps = [] if self.debug else [f"trainer.max_steps={steps}"]
        run_script("train", [f"experiment={experiment}", f"output_dir={run_dir}", *extra,
                          f"image_tokenizer={self.image_tok}", *max_steps, *self.devices,
                          f"data.text_tokenizer={self.tok_dir / 'tokenizer.json'}",
                          f"logger={self.cfg.logger.kind}", *self.debug_args, *overrides])
        model_dir = run_dir / "model"
        meta = json.loads((model_dir / "config.json").read_text())
        return {"steps": meta["steps"], "path": str(model_dir),
                "summary": f"{experiment}: {meta['steps']} steps -> {model_dir}"}

    # -- stage 3: sample and evaluate (GenEval-shapes, FID-shapes, captioning) ------------
    def evaluate(self, trained: dict) -> dict:
        path = self.out / "eval.json"
        return self.stages.run("evaluate", {"eval": [self.demo.eval_images_per_tag,
                                                     self.demo.eval_caption_images],
                                            "sampling": _recorded(self.model_dir),
                                            "model": trained},
                               [path], lambda: self._evaluate(path))

    def _evaluate(self, path: Path) -> dict:
        from fusion.families.folders import record_scores

        self._evaluate_script(["model", "--model", str(self.model_dir), "--images-per-tag",
                               str(self.demo.eval_images_per_tag), "--caption-images",
                               str(self.demo.eval_caption_images),
                               "--grid", str(self.out / "samples.png")], path)
        res = json.loads(path.read_text())
        record_scores(self.model_dir, res)  # into its config.json and model card
        return {**res, "summary": f"GenEval-shapes {res['geneval_overall']:.3f}, "
                                  f"FID-shapes {res.get('fid_shapes', float('nan')):.2f}, "
                                  f"captions {res['caption_single_object_accuracy']:.2f}"}

    def _evaluate_script(self, args: list[str], path: Path) -> None:
        """scripts/evaluate.py with the model's recorded sampling recipe (what it uses when no
        option says otherwise), the demo's seeds, and ``demo.processes`` processes."""
        device = "cuda" if self.cfg.trainer.accelerator in ("gpu", "cuda") else "cpu"
        run_script("evaluate", [*args, "--seed", str(self.cfg.seed), "--world-seed",
                             str(self.data.seed), "--device", device, "--json", str(path)],
                torchrun=self.demo.processes)

    # -- stage 4: a short editing fine-tune of the stage-2 model, scored (docs/editing.md) -
    def edit(self, trained: dict) -> dict:
        edit_model = self.edit_dir / "model"
        tuned = self.stages.run(
            "edit_finetune", {"steps": self.demo.edit_steps, "model": trained,
                              "over": self.demo.edit_overrides, "debug": self.debug},
            [edit_model / "model.safetensors"],
            lambda: self._train(f"edit_{self.family}_tiny", self.edit_dir, self.demo.edit_steps,
                                self.demo.edit_overrides, (f"init_from={self.model_dir}",)))
        path = self.out / "edit_eval.json"
        return self.stages.run("edit_evaluate", {"per_kind": self.demo.edit_per_kind,
                                                 "model": tuned,
                                                 "sampling": _recorded(edit_model)},
                               [path], lambda: self._edit_evaluate(edit_model, path))

    def _edit_evaluate(self, edit_model: Path, path: Path) -> dict:
        self._evaluate_script(["editing", "--model", str(edit_model), "--per-kind",
                               str(self.demo.edit_per_kind), "--grid",
                               str(self.out / "edits.png")], path)
        res = json.loads(path.read_text())
        return {**res, "summary": f"edit accuracy {res['edit_accuracy']:.3f} over "
                                  f"{res['edits']} held-out edits -> {self.out / 'edits.png'}"}

    # -- results ---------------------------------------------------------------------------
    def write_results(self, bpe: dict, detector: dict, trained: dict, scores: dict,
                      edits: dict) -> dict:
        results = {"family": self.family, "train_steps": trained["steps"],
                   "text_tokenizer_vocab": bpe["vocab_size"],
                   "detector_exact_recovery": detector["exact_recovery"],
                   **{k: v for k, v in scores.items() if isinstance(v, int | float)}}
        if edits:
            results["edit_accuracy"] = edits["edit_accuracy"]
            results.update({f"edit_accuracy_{kind}": edits[kind]["accuracy"]
                            for kind in ("recolor", "move", "add", "remove") if kind in edits})
            results["edit_psnr"] = edits["psnr"]
        write_results(self.out, results)
        return results


BEST_RESULTS = REPO / "docs" / "best_results.json"


def best_results(family: str) -> dict[str, tuple[float, str]]:
    """The best figure docs/ records for each metric of ``family``'s main-job table, with
    where it was measured: {metric: (value, where)}. Empty when the file is absent (an
    installed package without the repository's docs)."""
    if not BEST_RESULTS.exists():
        return {}
    return {k: tuple(v) for k, v in json.loads(BEST_RESULTS.read_text()).get(family, {}).items()}


def write_results(out: Path, results: dict) -> str:
    """results.md (the printed table) and results.json. Beside each score the table shows the
    best figure docs/ records for it, so a short run is read against what the recipes reach."""
    best = best_results(str(results.get("family", "")))

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    def reference(key: str) -> str:
        return f"{cell(best[key][0])} ({best[key][1]})" if key in best else ""

    rows = "\n".join(f"| {k} | {cell(v)} | {reference(k)} |" for k, v in results.items())
    table = f"| metric | this run | best in docs/ (where) |\n|---|---|---|\n{rows}\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return table
