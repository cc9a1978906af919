"""Stage-2 training from pre-encoded shards against encoding every image on the fly.

    python scripts/bench.py encoded                       # both tiny recipes, CPU
    python scripts/bench.py encoded --images 4096 --steps 60

Builds ShapesWorld image shards once, encodes them with each family's image tokenizer
(scripts/encode_dataset.py's fusion.training.pre_encode), then trains each recipe from the image
shards (the frozen tokenizer encodes every batch; ``encode_cache_mb=0`` so that no cache hides
it) and from the encoded shards, with the same batch, steps and threads. Reported: the median
of ``perf/step_seconds`` after ``--warmup`` steps, and how much faster the encoded data is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from fusion.benchmarks.ddp import train_step_seconds

RECIPES = {"transfusion_tiny": "tokenizers/shapes-vae", "chameleon_tiny": "tokenizers/shapes-vqgan"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py encoded", description=__doc__.splitlines()[0])
    p.add_argument("--experiments", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--images", type=int, default=2048, help="ShapesWorld scenes in the shards")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="data.num_workers")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from fusion.data.export import write_shards
    from fusion.training.pre_encode import encode_dataset

    args = parse_args(argv)
    print(f"{args.images} ShapesWorld images, batch {args.batch_size}, {args.steps} steps "
          f"(median after {args.warmup}), {args.workers} loader worker(s), "
          f"{args.threads} threads")
    print(f"{'recipe':>18s} {'on the fly ms':>14s} {'encoded ms':>11s} {'speed-up':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(tmp / "images", 256, num_images=args.images, show_progress=False)
        for experiment in args.experiments:
            artifact = RECIPES[experiment]
            encoded = tmp / f"encoded-{experiment}"
            encode_dataset(encoded, artifact, shards=f"{tmp / 'images'}/*.tar", shard_size=256,
                           show_progress=False)
            common = [f"experiment={experiment}", f"image_tokenizer={artifact}", "data=shards",
                      f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
                      "encode_cache_mb=0"]
            times = {}
            for name, folder in (("images", tmp / "images"), ("encoded", encoded)):
                times[name] = statistics.median(train_step_seconds(
                    [*common, f"data.shards={folder}/*.tar"], tmp / f"run-{experiment}-{name}",
                    args.steps, args.warmup, args.threads))
            print(f"{experiment:>18s} {times['images'] * 1e3:14.1f} "
                  f"{times['encoded'] * 1e3:11.1f} {times['images'] / times['encoded']:9.2f}")
