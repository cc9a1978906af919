"""Studies: each family trained at a ladder of training-FLOP budgets (a compute study) or
of edit-data sizes (an editing-data study), every run scored alike.

The Transfusion paper's central comparison (arXiv:2408.11039, Sec. 4.2) trains Transfusion and
Chameleon at matched compute and reports, per metric, the *parity FLOP ratio*: the share of
Chameleon's training FLOPs with which Transfusion reaches Chameleon's score. This module runs
that comparison on fusion's recipes (``scripts/study.py``, a study is ``conf/study/<name>.yaml``):

* every (family, budget, seed) is one ``scripts/train.py`` run of the family's recipe with
  ``optim.flops_budget`` = the budget, so the cosine schedule ends exactly at it and the count
  is the same on any machine (FLOPs per position: fusion.models.transformer, with attention);
* every run is scored the same way by ``scripts/evaluate.py model``: GenEval-shapes pooled over
  several prompt sets, FID-shapes and captioning; and by ``scripts/evaluate.py text``: the
  held-out text loss on unseen captions (fusion.eval.text_loss);
* the rows go to ``table.jsonl`` after every run, ``summary.md`` holds the side-by-side table
  and the parity ratios, and one PNG per metric draws the curves (metric vs FLOPs, log x;
  matplotlib, the ``study`` extra).

An editing-data study (``study.edit_triplets``) is the same harness on the edit fine-tunes:
each run starts from ``study.init_from[family]``, trains the family's edit recipe on that many
distinct ShapesWorld edit triplets at the same FLOP budget, and is scored by
``scripts/evaluate.py editing`` (accuracy per edit kind); x is the number of triplets.

Runs and scores are stages of :class:`fusion.pipeline.StageRunner`: a re-run reuses every
finished one and an interrupted run resumes from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fusion.config import resolve_path
from fusion.data.shapes import TAGS
from fusion.errors import UserError
from fusion.pipeline import StageRunner, run_script

log = logging.getLogger(__name__)

# metric -> (label, higher is better, the paper's parity FLOP ratio or None)
# Paper figures: Transfusion (arXiv:2408.11039), Table 2 at 7B: MS-COCO FID 0.029 (1/34),
# CIDEr 0.218, C4 perplexity 0.489. GenEval has no parity figure there.
METRICS: dict[str, tuple[str, bool, float | None]] = {
    "geneval_overall": ("GenEval-shapes", True, None),
    "fid_shapes": ("FID-shapes", False, 0.029),
    "caption_single_object_accuracy": ("captions, class + colour", True, 0.218),
    "text_loss": ("held-out text loss (nats/token)", False, 0.489),
}
EDIT_KINDS = ("recolor", "move", "add", "remove")
EDIT_METRICS: dict[str, tuple[str, bool, float | None]] = {
    "edit_accuracy": ("edit accuracy, all kinds", True, None),
    **{f"edit_accuracy_{k}": (f"edit accuracy, {k}", True, None) for k in EDIT_KINDS},
    # Chameleon only (fusion.eval.edit_diagnosis, teacher-forced on the held-out edits): how
    # well it predicts the codes an edit changes, which sampled accuracy hides while it is ~0
    "changed_cells_nll": ("changed-cell nll (nats)", False, None),
    "changed_cells_right": ("changed cells right", True, None),
}


@dataclass(frozen=True)
class Run:
    family: str
    budget: float  # training FLOPs
    seed: int
    edits: int | None = None  # editing-data studies: distinct edit triplets

    @property
    def name(self) -> str:
        edits = f"_{self.edits}edits" if self.edits is not None else ""
        return f"{self.family}{edits}_{self.budget:.3g}_seed{self.seed}".replace("+", "")

    def key(self) -> dict:
        """What identifies the run in its stage fingerprint (the fields that are set)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def study_metrics(study) -> dict[str, tuple[str, bool, float | None]]:
    return EDIT_METRICS if study.edit_triplets else METRICS


def x_axis(study) -> tuple[str, str, str]:
    """(row key of a point's x, row key that groups seeds into one point, axis label)."""
    if study.edit_triplets:
        return "edits", "edits", "distinct edit triplets"
    return "train_flops", "budget", "training FLOPs"


def plan_runs(study) -> list[Run]:
    """Every run of ``study`` (a StudySettings node), cheapest first and the first seed before
    the others, so a study stopped part-way has its small budgets complete."""
    from fusion.families import names

    unknown = [f for f in study.families if f not in names()]
    if unknown or not study.families:
        raise UserError(f"study.families: unknown {unknown or 'none given'}; known: "
                        f"{', '.join(names())}")
    budgets = sorted(float(b) for b in study.budgets)
    if not budgets or budgets[0] <= 0 or len(set(budgets)) != len(budgets):
        raise UserError(f"study.budgets must be distinct positive FLOP counts, got "
                        f"{list(study.budgets)}")
    if not study.seeds:
        raise UserError("study.seeds is empty: give at least one seed")
    edits: list[int | None] = sorted(int(n) for n in study.edit_triplets) or [None]
    if study.edit_triplets:
        if edits[0] < 1 or len(set(edits)) != len(edits):
            raise UserError(f"study.edit_triplets must be distinct counts >= 1, got "
                            f"{list(study.edit_triplets)}")
        if len(budgets) != 1:
            raise UserError(f"an editing-data study trains every run at one FLOP budget (the "
                            f"same compute at every data size); got budgets {budgets}")
        missing = [f for f in study.families if not study.init_from.get(f)]
        if missing:
            raise UserError(f"an editing-data study fine-tunes a trained model: set "
                            f"study.init_from.{missing[0]}=<model folder> (missing for "
                            f"{', '.join(missing)})")
    up_to = study.extra_seeds_up_to
    runs = [Run(f, b, study.seeds[0], n) for b in budgets for n in edits
            for f in study.families]
    runs += [Run(f, b, seed, n) for seed in study.seeds[1:] for b in budgets
             if up_to is None or b <= up_to for n in edits for f in study.families]
    return runs


def run_study(cfg: DictConfig) -> list[dict]:
    """Train and score every planned run (reusing finished ones); returns the table rows."""
    study, out = cfg.study, Path(cfg.output_dir)
    runs = plan_runs(study)
    stages = StageRunner(out)
    rows = []
    for i, run in enumerate(runs, 1):
        print(f"== study {study.name}: run {i}/{len(runs)}: {run.name}", flush=True)
        run_dir = out / "runs" / run.name
        overrides = [study.experiment.format(family=run.family), *study.train_overrides,
                     *study.family_overrides.get(run.family, [])]
        if run.edits is not None:
            overrides += [f"data.num_train={run.edits}",
                          f"init_from={resolve_path(study.init_from[run.family])}"]
        trained = stages.run(
            f"train/{run.name}", {"run": run.key(), "over": overrides,
                                  "tok": cfg.text_tokenizer},
            [run_dir / "model" / "model.safetensors"],
            lambda run=run, run_dir=run_dir, overrides=overrides:
                _train(cfg, run, run_dir, overrides))
        scores = stages.run(
            f"score/{run.name}", {"scoring": study.scoring, "trained": trained,
                                  **({"per_kind": study.edits_per_kind} if run.edits else {})},
            [run_dir / "scores.json"],
            lambda run=run, run_dir=run_dir:
                _score_edits(cfg, run_dir, diagnose=run.family == "chameleon")
                if run.edits is not None else _score(cfg, run_dir))
        text = {}
        if run.edits is None:  # its own stage: cheap, and independent of the image scores
            text = stages.run(
                f"text/{run.name}", {"documents": study.scoring.text_loss_documents,
                                     "trained": trained}, [run_dir / "text_loss.json"],
                lambda run_dir=run_dir: _text_loss(cfg, run_dir))
        rows.append({**run.key(), **trained, **scores, **text})
        write_table(out / "table.jsonl", rows)
    return rows


def _train(cfg: DictConfig, run: Run, run_dir: Path, overrides: list[str]) -> dict:
    experiment, *rest = overrides
    run_script("train", [
        f"experiment={experiment}", f"output_dir={run_dir}", f"seed={run.seed}",
        f"optim.flops_budget={run.budget:.6g}",
        "trainer.max_steps=100000000",  # a cap only: the FLOP budget ends the run and its cosine
        f"data.text_tokenizer={resolve_path(cfg.text_tokenizer)}", f"logger={cfg.logger}",
        f"trainer.accelerator={cfg.accelerator}",
        *([f"debug={cfg.study.debug}"] if cfg.study.debug else []), *rest])
    meta = json.loads((run_dir / "model" / "config.json").read_text())
    return {"steps": meta["steps"], "train_flops": meta["train_flops"],
            "summary": f"{meta['steps']} steps, {meta['train_flops']:.3g} FLOPs"}


def _evaluate(cfg: DictConfig, run_dir: Path, command: str, options: list[str],
              json_name: str = "scores.json") -> dict:
    """``scripts/evaluate.py <command>`` on the run's model folder; its JSON summary."""
    path = run_dir / json_name
    device = "cuda" if cfg.accelerator in ("gpu", "cuda") else "cpu"
    run_script("evaluate", [command, "--model", str(run_dir / "model"), *options,
                            "--device", device, "--json", str(path)])
    return json.loads(path.read_text())


def _score(cfg: DictConfig, run_dir: Path) -> dict:
    s = cfg.study.scoring
    res = _evaluate(cfg, run_dir, "model", [
        "--images-per-tag", str(s.images_per_tag), "--caption-images", str(s.caption_images),
        "--world-seeds", *map(str, s.world_seeds), *([] if s.fid else ["--no-fid"])])
    figures = {k: v for k, v in res.items() if isinstance(v, float)}
    figures.update({f"geneval_{t}": res[f"geneval_{t}"]["score"] for t in TAGS
                    if isinstance(res.get(f"geneval_{t}"), dict)})
    return {**figures, "summary": ", ".join(f"{METRICS[k][0]} {figures[k]:.3f}"
                                            for k in METRICS if k in figures)}


def _text_loss(cfg: DictConfig, run_dir: Path) -> dict:
    res = _evaluate(cfg, run_dir, "text", ["--documents",
                                           str(cfg.study.scoring.text_loss_documents)],
                    json_name="text_loss.json")
    return {"text_loss": res["text_loss"], "summary": f"text loss {res['text_loss']:.4f}"}


def _score_edits(cfg: DictConfig, run_dir: Path, diagnose: bool = False) -> dict:
    per_kind = ["--per-kind", str(cfg.study.edits_per_kind)]
    res = _evaluate(cfg, run_dir, "editing", per_kind)
    figures = {"edit_accuracy": res["edit_accuracy"], "edit_psnr": res["psnr"],
               **{f"edit_accuracy_{k}": res[k]["accuracy"] for k in EDIT_KINDS if k in res}}
    if diagnose:  # the kinds have equal edit counts, so their plain mean is the pooled one
        res = _evaluate(cfg, run_dir, "editing", [*per_kind, "--diagnose"], "diagnosis.json")
        for name, key in (("changed_cells_nll", "teacher_forced_nll"),
                          ("changed_cells_right", "teacher_forced_accuracy")):
            figures[name] = float(np.mean([res[k][key]["changed"] for k in EDIT_KINDS]))
    return {**figures, "summary": ", ".join(f"{k} {v:.3f}" for k, v in figures.items())}


def write_table(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_table(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"no study table at {path}: run the study first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- analysis -------------------------------------------------------------------------------
def curve(rows: list[dict], family: str, metric: str, x: str = "train_flops",
          group: str = "budget") -> tuple[np.ndarray, np.ndarray]:
    """(x, metric) of ``family``'s seed means, one point per value of ``group`` (the budget,
    or the edit-triplet count), smallest first; a point's x is the mean of its runs' ``x``
    (their counted FLOPs in a compute study)."""
    points: dict[float, list[dict]] = {}
    for r in rows:
        if r["family"] == family and r.get(metric) is not None:
            points.setdefault(r[group], []).append(r)
    keys = sorted(points)
    return (np.array([np.mean([r[x] for r in points[k]]) for k in keys]),
            np.array([np.mean([r[metric] for r in points[k]]) for k in keys]))


def flops_to_reach(x: np.ndarray, y: np.ndarray, target: float,
                   higher_is_better: bool) -> tuple[float, str]:
    """The FLOPs at which the curve (x, y) first reaches ``target``, interpolating linearly in
    log FLOPs between budgets: ``(flops, "=")``; ``(x[0], "≤")`` when its cheapest point
    already does; ``(x[-1], ">")`` when no point does."""
    sign = 1.0 if higher_is_better else -1.0
    reached = sign * (y - target) >= 0
    if not reached.any():
        return float(x[-1]), ">"
    k = int(np.argmax(reached))
    if k == 0:
        return float(x[0]), "≤"
    lx0, lx1 = math.log(x[k - 1]), math.log(x[k])
    share = (target - y[k - 1]) / (y[k] - y[k - 1])
    return float(math.exp(lx0 + share * (lx1 - lx0))), "="


def parity_ratios(rows: list[dict], reference: str = "chameleon",
                  challenger: str = "transfusion") -> dict[str, dict]:
    """Per metric: the parity FLOP ratio, ``challenger``'s FLOPs to reach ``reference``'s
    score at its largest budget over those FLOPs (< 1: the challenger needs less compute),
    with ``relation`` "=", "≤" (reached at its cheapest budget already: an upper bound) or
    ">" (never reached on the ladder: a lower bound)."""
    ratios = {}
    for metric, (_, higher, _) in METRICS.items():
        rx, ry = curve(rows, reference, metric)
        cx, cy = curve(rows, challenger, metric)
        if not len(rx) or not len(cx):
            continue
        flops, relation = flops_to_reach(cx, cy, float(ry[-1]), higher)
        ratios[metric] = {"ratio": flops / float(rx[-1]), "relation": relation,
                          "target": float(ry[-1]), "reference_flops": float(rx[-1])}
    return ratios


def summary_markdown(rows: list[dict], families: list[str], metrics: dict | None = None,
                     group: str = "budget") -> str:
    """The side-by-side table (every run's figure per point of the ladder) and, for a compute
    study of both families, the parity FLOP ratios."""
    metrics = metrics or METRICS
    label = "budget (FLOPs)" if group == "budget" else "edit triplets"
    # a (metric, family) column only where some run has the figure (the changed-cell scores
    # are Chameleon's alone; a study scored without FID has none)
    columns = [(m, f) for m in metrics for f in families
               if any(r["family"] == f and r.get(m) is not None for r in rows)]
    head = f"| {label} | " + " | ".join(f"{f}: {metrics[m][0]}" for m, f in columns) + " |"
    lines = [head, "|---" * (1 + len(columns)) + "|"]
    for point in sorted({r[group] for r in rows}):
        cells = []
        for m, f in columns:
            vals = [r[m] for r in rows if r["family"] == f and r[group] == point
                    and r.get(m) is not None]
            cells.append(" / ".join(f"{v:.3f}" for v in vals) if vals else "—")
        lines.append(f"| {point:.3g} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nSeeds are separated by ` / `.\n"
    if metrics is METRICS and {"transfusion", "chameleon"} <= set(families):
        text += ("\n| metric | parity FLOP ratio (Transfusion / Chameleon) | Chameleon's score at "
                 "its largest budget | the paper |\n|---|---|---|---|\n")
        for m, p in parity_ratios(rows).items():
            paper = METRICS[m][2]
            text += (f"| {METRICS[m][0]} | {p['relation']} {p['ratio']:.3g} | {p['target']:.3f} "
                     f"| {paper if paper is not None else '—'} |\n")
    return text


def draw_curves(rows: list[dict], families: list[str], folder: Path,
                metrics: dict | None = None, x: str = "train_flops", group: str = "budget",
                x_label: str = "training FLOPs") -> list[Path]:
    """One PNG per metric: each family's seed means against ``x`` (log x), its single runs as
    dots. Needs matplotlib (``pip install 'fusion[study]'``); without it the plots are
    skipped with a warning and [] is returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'fusion[study]'): no plots")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, (label, higher, _) in (metrics or METRICS).items():
        if not any(r.get(metric) is not None for r in rows):
            continue  # not scored in this study (e.g. scoring.fid=false)
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for family in families:
            xs, ys = curve(rows, family, metric, x, group)
            if not len(xs):
                continue
            (line,) = ax.plot(xs, ys, marker="o", label=family)
            single = [(r[x], r[metric]) for r in rows
                      if r["family"] == family and r.get(metric) is not None]
            ax.scatter(*zip(*single, strict=True), s=12, alpha=0.5, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(label + (" (higher is better)" if higher else " (lower is better)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / f"study_{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def report(cfg: DictConfig, rows: list[dict]) -> str:
    """Writes summary.md (and the plots) for ``rows``; returns the summary text."""
    out = Path(cfg.output_dir)
    families = list(OmegaConf.to_container(cfg.study.families))
    metrics = study_metrics(cfg.study)
    x, group, x_label = x_axis(cfg.study)
    text = summary_markdown(rows, families, metrics, group)
    (out / "summary.md").write_text(text)
    plots = draw_curves(rows, families, Path(cfg.plots_dir or out), metrics, x, group, x_label)
    return text + "".join(f"\nplot: {p}" for p in plots) + "\n"
