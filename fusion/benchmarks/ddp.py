"""Data-parallel training against one process: the same recipe and global batch, step times.

    python scripts/bench.py ddp                                  # transfusion_tiny, CPU, 2 ranks
    python scripts/bench.py ddp --experiment chameleon_tiny --strategies ddp fsdp
    python scripts/bench.py ddp --accelerator gpu --devices 8 --batch-size 256

Each case is ``scripts/train.py`` as a user runs it (Lightning starts the ranks), with the
same global ``data.batch_size``: one process, then each strategy over ``--devices`` ranks.
Reported: the median of ``perf/step_seconds`` (fusion.training.callbacks.StepTimer) after
``--warmup`` steps, documents per second and the speed-up over one process. On a CPU, one
process gets every core as threads and each rank gets its share, so the comparison is of the
same hardware used two ways.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py ddp", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="transfusion_tiny", help="a conf/experiment name")
    p.add_argument("--strategies", nargs="+", default=["ddp"], choices=["ddp", "fsdp"])
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--devices", type=int, default=2, help="ranks of the parallel cases")
    p.add_argument("--batch-size", type=int, default=32, help="the global batch")
    p.add_argument("--steps", type=int, default=40, help="training steps per case")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads in all (split over the ranks on a CPU)")
    p.add_argument("overrides", nargs="*", help="more scripts/train.py overrides")
    return p.parse_args(argv)


def step_seconds(csv_path: Path, warmup: int) -> list[float]:
    with csv_path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("perf/step_seconds")]
    return [float(r["perf/step_seconds"]) for r in rows if int(r["step"]) >= warmup]


def train_step_seconds(overrides: list[str], out: Path, steps: int, warmup: int,
                       threads: int) -> list[float]:
    """Step times of ``scripts/train.py <overrides>`` for ``steps`` steps (no validation,
    checkpoints, grids or progress bar), read back from its CSV log after ``warmup`` steps."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides, f"output_dir={out}",
           "logger=csv", "trainer.log_every_n_steps=1", f"trainer.max_steps={steps}",
           "trainer.limit_val_batches=0", "sampling.prompts=[]",
           "callbacks.checkpoint_every_n_steps=0", "callbacks.checkpoint_every_minutes=0",
           "callbacks.progress_bar=none"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return step_seconds(out / "csv" / "metrics.csv", warmup)


def run_case(args, strategy: str | None, out: Path) -> list[float]:
    ranks = args.devices if strategy else 1
    threads = max(1, args.threads // ranks) if args.accelerator == "cpu" else args.threads
    overrides = [f"experiment={args.experiment}", f"trainer.accelerator={args.accelerator}",
                 f"data.batch_size={args.batch_size}",
                 *([f"trainer={strategy}", f"trainer.accelerator={args.accelerator}",
                    f"trainer.devices={ranks}"] if strategy else []), *args.overrides]
    return train_step_seconds(overrides, out, args.steps, args.warmup, threads)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"{args.experiment}, global batch {args.batch_size}, {args.steps} steps "
          f"(median after {args.warmup}), {args.accelerator}, {args.threads} threads in all")
    print(f"{'case':>16s} {'ranks':>5s} {'step ms':>8s} {'docs/s':>8s} {'speed-up':>8s}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in [None, *args.strategies]:
            times = run_case(args, strategy, Path(tmp) / (strategy or "one"))
            median = statistics.median(times)
            base = base or median
            print(f"{strategy or 'one process':>16s} {args.devices if strategy else 1:5d} "
                  f"{median * 1e3:8.1f} {args.batch_size / median:8.1f} {base / median:8.2f}")
