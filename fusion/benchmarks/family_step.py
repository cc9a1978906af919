"""A whole family training step at a backbone size: tokens/s, MFU, peak memory, time by part.

    python scripts/bench.py family-step                            # tiny recipes, this CPU
    python scripts/bench.py family-step --backbone 350m --seq 4096 --rows 4 --device cuda \\
        --max-rows 64

A family recipe (``--experiment``) with its backbone swapped for a preset (``--backbone``)
and its documents packed into rows of ``--seq`` positions (the backbone's ``max_seq_len`` and
``loss.pack_len`` both set to it). The recipe's ShapesWorld caption documents are drawn
until they fill ``--rows`` rows, prepared once (as a loader worker would) and trained on
again and again: the family's ``compute`` (the frozen image tokenizer, noise, the model and
the loss) under the recipe's precision, backward, clipping and AdamW. Each step is timed in
parts, synchronised on CUDA: image encoding, the rest of the forward pass with the loss,
backward, and the optimizer; medians of ``--rounds``. Tokens are the packed positions that are
not padding; MFU counts the family's training FLOPs per position
(fusion.families.training_flops_per_position) against ``--peak-tflops`` (default on CUDA: H100
SXM bf16 dense). On CUDA, ``--max-rows N`` doubles the rows from ``--rows`` up to N and
reports the most that fit in memory.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from fusion.benchmarks.transformer import H100_BF16_DENSE_TFLOPS
from fusion.models.transformer import count_parameters

PARTS = ("encode", "forward + loss", "backward", "optimizer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py family-step", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", nargs="+", default=["transfusion_tiny", "chameleon_tiny"],
                   help="conf/experiment names")
    p.add_argument("--backbone", help="a backbone preset instead of the recipe's (e.g. 350m)")
    p.add_argument("--seq", type=int, help="positions per packed row (default: the recipe's)")
    p.add_argument("--rows", type=int, default=4, help="packed rows per step")
    p.add_argument("--max-rows", type=int, help="CUDA: find the most rows that fit, up to this")
    p.add_argument("--rounds", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--peak-tflops", type=float,
                   help=f"peak for MFU (default on CUDA: {H100_BF16_DENSE_TFLOPS}, H100 SXM bf16)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more Hydra overrides for every recipe")
    return p.parse_args(argv)


def _overrides(experiment: str, args: argparse.Namespace) -> list[str]:
    out = [f"experiment={experiment}", *args.set]
    if args.backbone:
        out.append(f"model.arch.backbone={args.backbone}")
    if args.seq:
        out += [f"++model.arch.backbone_overrides.max_seq_len={args.seq}",
                f"model.loss.pack_len={args.seq}"]
    return out


class FamilyStep:
    """One recipe's model, loss and optimizer, and the prepared batch of ``rows`` rows it
    trains on; calling it runs one step and returns the seconds of each part."""

    def __init__(self, experiment: str, args: argparse.Namespace, rows: int):
        from fusion.config import compose, resolve_path
        from fusion.data.datamodule import DocumentDataModule
        from fusion.data.text import TextTokenizer
        from fusion.families import build_family, load_image_tokenizer
        from fusion.families.registry import training_flops_per_position
        from fusion.training.factory import resolve_precision

        self.device = torch.device(args.device)
        cfg = compose("train", _overrides(experiment, args))
        tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
        self.image_tok = load_image_tokenizer(cfg.image_tokenizer).to(self.device).eval()
        torch.manual_seed(0)
        model, self.loss = build_family(cfg.model, tok, self.image_tok, cfg.data.image_size)
        self.model = model.to(self.device)
        data = DocumentDataModule(cfg.data, tok)
        data.setup("fit")
        self.batch = self._fill(data.train_set, rows)
        self.positions = int((self.batch.packed.doc_ids >= 0).sum())
        self.flops = training_flops_per_position(model, self.loss) * self.positions
        self.precision = str(resolve_precision(cfg.trainer.precision, self.device.type))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr)
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.step_count = 0

    def _fill(self, records, rows: int):
        """Prepared documents that fill ``rows`` rows (first fit leaves little room)."""
        spec = self.loss.rows(self.model)
        sample = self.loss.prepare([records[i] for i in range(64)], random.Random(0), spec)
        per_doc = float((sample.packed.doc_ids >= 0).sum()) / 64
        n = int(rows * spec.row_length / per_doc)
        if n > len(records):
            raise SystemExit(f"{rows} rows of {spec.row_length} need ~{n} documents; the data "
                             f"has {len(records)} (raise data.num_train)")
        while True:
            batch = self.loss.prepare([records[i] for i in range(n)], random.Random(0), spec)
            if batch.packed.ids.shape[0] <= rows:
                return batch
            n = int(n * 0.98)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self) -> dict[str, float]:
        seconds = dict.fromkeys(PARTS, 0.0)

        def encode(pixels):  # timed inside compute, which calls it once
            start = self._sync()
            out = self.image_tok.encode(pixels)
            seconds["encode"] += self._sync() - start
            return out

        bf16 = self.precision.startswith("bf16")
        g = torch.Generator(self.device).manual_seed(self.step_count)
        self.step_count += 1
        start = self._sync()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = self.loss.compute(self.model, self.batch, encode, g)["loss"]
        mark = self._sync()
        seconds["forward + loss"] = mark - start - seconds["encode"]
        loss.backward()
        after = self._sync()
        seconds["backward"] = after - mark
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        seconds["optimizer"] = self._sync() - after
        return seconds


def most_rows_that_fit(experiment: str, args: argparse.Namespace) -> int | None:
    """The most packed rows (``--rows`` doubled up to ``--max-rows``) whose step fits in CUDA
    memory, or None when even ``--rows`` does not."""
    best, rows = None, args.rows
    while rows <= args.max_rows:
        try:
            step = FamilyStep(experiment, args, rows)
            step()
            step()
            best = rows
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = None
            torch.cuda.empty_cache()
        rows *= 2
    return best


def measure(experiment: str, args: argparse.Namespace) -> dict:
    step = FamilyStep(experiment, args, args.rows)
    cuda = step.device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(step.device)
    runs = [step() for _ in range(args.rounds)]
    parts = {k: statistics.median(r[k] for r in runs) for k in PARTS}
    total = statistics.median(sum(r.values()) for r in runs)
    return dict(experiment=experiment, params=count_parameters(step.model),
                shape=f"{step.batch.packed.ids.shape[0]}×{step.batch.packed.ids.shape[1]}",
                documents=len(step.batch), tokens=step.positions / total,
                tflops=step.flops / total / 1e12, parts=parts, total=total,
                precision=step.precision,
                peak_gib=torch.cuda.max_memory_allocated(step.device) / 2**30 if cuda else None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if cuda else None)
    results = [measure(e, args) for e in args.experiment]
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(f"{args.device} ({where}), torch {torch.__version__}; median of {args.rounds} steps "
          f"after {args.warmup}" + (f"; MFU against {peak} TFLOP/s" if peak else "") + "\n")
    print("| recipe | precision | parameters | rows×S | documents | ms/step | tokens/s | "
          "TFLOP/s | MFU | peak memory | " + " | ".join(PARTS) + " |")
    print("|---" * (10 + len(PARTS)) + "|")
    for r in results:
        shares = " | ".join(f"{r['parts'][k] / r['total']:.0%}" for k in PARTS)
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "-"
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        print(f"| {r['experiment']} | {r['precision']} | {r['params'] / 1e6:.1f} M | "
              f"{r['shape']} | {r['documents']} | {1000 * r['total']:.1f} | "
              f"{r['tokens']:,.0f} | {r['tflops']:.3g} | {mfu} | {mem} | {shares} |")
    if cuda and args.max_rows:
        for e in args.experiment:
            print(f"{e}: the most rows of this length that fit: {most_rows_that_fit(e, args)} "
                  f"(tried {args.rows} doubling to {args.max_rows})")
