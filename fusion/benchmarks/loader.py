"""The input pipeline against the training step: documents/s of the loader alone and of the step.

    python scripts/bench.py loader                     # both tiny recipes, 0 and 2 workers
    python scripts/bench.py loader --experiment transfusion_tiny --workers 0 1 2 --batch 128
    python scripts/bench.py loader --device cuda       # the step on a GPU

The loader is `scripts/train.py`'s training loader: records read (ShapesWorld scenes drawn, a
folder's images decoded or shards streamed, as the recipe's ``data`` says; ``--set`` adds
overrides), captions tokenised, and every batch prepared by the family in the loader workers
(packing, dropout and CM3 draws, images stacked; fusion.models.packing.PreparedBatch). It is
iterated alone for ``--batches`` batches after its first (worker start-up is not counted). The
step is what the training process is left with on those batches: the family's ``compute``
(image encoding without the encode cache, noise, forward) under the recipe's precision,
backward, clipping and AdamW, median of ``--rounds``. The loader keeps the step fed while its
documents/s exceeds the step's; the report gives the ratio (fusion's target: 3x). It also times
``prepare`` of one batch in this process: the work that used to sit in every training step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from fusion.benchmarks.train_step import training_step
from fusion.benchmarks.transformer import time_cases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py loader", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", nargs="+", default=["transfusion_tiny", "chameleon_tiny"],
                   help="conf/experiment names")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="data.num_workers values to time the loader with")
    p.add_argument("--batch", type=int, help="documents per batch (default: the recipe's)")
    p.add_argument("--batches", type=int, default=20, help="timed loader batches per case")
    p.add_argument("--rounds", type=int, default=8, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    p.add_argument("--device", default="cpu", help="where the step runs: cpu | cuda")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more Hydra overrides for every recipe (e.g. data.source=shards ...)")
    return p.parse_args(argv)


def loader_rate(data, batches: int) -> tuple[float, list]:
    """(documents/s, the batches) of ``data``'s training loader alone, after its first batch."""
    loader = iter(data.train_dataloader())
    first = [next(loader)]
    start = time.perf_counter()
    got = [next(loader) for _ in range(batches)]
    seconds = time.perf_counter() - start
    return sum(len(b) for b in got) / seconds, first + got


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(experiment: str, args: argparse.Namespace, device: torch.device) -> tuple:
    """(batch, {workers: loader documents/s}, step precision, step s, step documents/s,
    prepare s) of one recipe."""
    from omegaconf import open_dict

    from fusion.config import compose, resolve_path
    from fusion.data.datamodule import DocumentDataModule
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.training.factory import resolve_precision

    cfg = compose("train", [f"experiment={experiment}", *args.set])
    with open_dict(cfg):
        cfg.data.batch_size = args.batch or cfg.data.batch_size
    tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    image_tok = load_image_tokenizer(cfg.image_tokenizer)
    torch.manual_seed(0)
    model, loss = build_family(cfg.model, tok, image_tok, cfg.data.image_size)
    data = DocumentDataModule(cfg.data, tok, prepare=loss.preparer(model),
                              text_budget=lambda n: loss.text_budget(model, n))
    data.setup("fit")  # once: opening the data checks every record
    rates, batches = {}, []
    for workers in args.workers:
        data.cfg.num_workers = workers  # read when the loader is made
        rates[workers], got = loader_rate(data, args.batches)
        batches = batches or got
    raw, rows = [data.train_set[i] for i in range(cfg.data.batch_size)], loss.rows(model)
    prepare_s = statistics.median(
        _seconds(lambda: loss.prepare(raw, random.Random(0), rows)) for _ in range(5))
    model, image_tok = model.to(device), image_tok.to(device)
    precision = str(resolve_precision(cfg.trainer.precision, device.type))
    bf16 = precision.startswith("bf16")
    step = training_step(model, lambda i: loss.compute(
        model, batches[i % len(batches)], image_tok.encode,
        torch.Generator(device).manual_seed(i))["loss"], cfg.optim.lr, bf16, device.type)
    step_s = time_cases({"step": step}, args.warmup, args.rounds, device)["step"]
    return cfg.data.batch_size, rates, precision, step_s, cfg.data.batch_size / step_s, prepare_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = [(experiment, *measure(experiment, args, device)) for experiment in args.experiment]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"step on {args.device} ({where}), torch {torch.__version__}; loader: "
          f"{args.batches} batches after the first; step: median of {args.rounds}\n")
    print("| recipe | batch | loader workers | loader documents/s | step precision | "
          "step documents/s | loader / step | prepare in-process, ms/batch (share of the step) |")
    print("|---|---|---|---|---|---|---|---|")
    for experiment, batch, rates, precision, step_s, step_rate, prepare_s in rows:
        for workers, rate in rates.items():
            print(f"| {experiment} | {batch} | {workers} | {rate:,.0f} | {precision} | "
                  f"{step_rate:,.0f} | {rate / step_rate:.2f}x | {1000 * prepare_s:.1f} "
                  f"({prepare_s / step_s:.0%}) |")
