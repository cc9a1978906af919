"""One training step of a family recipe on real ShapesWorld batches: row length x SDPA kernel.

    python scripts/bench.py train-step                                # transfusion_tiny
    python scripts/bench.py train-step --experiment chameleon_tiny --pack-len 256 128

A step is what ``FusionModule`` does per batch, without Lightning: the family loss (packing,
frozen tokenizer through the encode cache, forward) under the recipe's precision, backward,
gradient clipping at 1.0 and AdamW. Every case runs the same model weights on the same
batches. ``--pack-len`` sets ``model.loss.pack_len`` (the row length documents are packed
into; ``0`` = the backbone's max_seq_len); ``--backends`` sets the backbone's ``attn_backend``
(``auto`` takes SDPA's math kernel for short bf16 CPU training rows, ``sdpa`` leaves the
kernel to torch). Cases are timed round-robin and the median step is reported
(`fusion.benchmarks.transformer.time_cases`), so slow drift of a shared machine hits every
case alike.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
from collections.abc import Callable

import torch
from omegaconf import open_dict

from fusion.benchmarks.transformer import time_cases


def training_step(model: torch.nn.Module, loss_of_step: Callable[[int], torch.Tensor],
                  lr: float, bf16: bool, device: str) -> Callable[[], None]:
    """One optimiser step per call, as FusionModule takes it without Lightning: the loss of
    step i (``loss_of_step(i)``, under bf16 autocast when ``bf16``), backward, gradient
    clipping at 1.0, AdamW. Shared by the benchmarks that time training steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    counter = itertools.count()

    def step() -> None:
        i = next(counter)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of_step(i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py train-step", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="transfusion_tiny", help="a conf/experiment name")
    p.add_argument("--pack-len", type=int, nargs="+", default=[0, 64],
                   help="row lengths to compare (0 = the backbone's max_seq_len)")
    p.add_argument("--backends", nargs="+", default=["auto", "sdpa"],
                   choices=["auto", "sdpa"], help="attn_backend values to compare")
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    p.add_argument("--rounds", type=int, default=12, help="timed steps per case")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from fusion.config import compose, resolve_path
    from fusion.data.datamodule import DocumentDataModule
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.training.encode_cache import EncodeCache
    from fusion.training.factory import resolve_precision

    args = parse_args(argv)
    cfg = compose("train", [f"experiment={args.experiment}"])
    tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    data = DocumentDataModule(cfg.data, tok)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    image_tok = load_image_tokenizer(cfg.image_tokenizer)
    encode = EncodeCache(image_tok.encode, 256 * 2**20)  # every case reads the same cache
    bf16 = str(resolve_precision(cfg.trainer.precision, "cpu")).startswith("bf16")

    def make_step(pack_len: int, backend: str):
        model_cfg = copy.deepcopy(cfg.model)
        with open_dict(model_cfg):
            model_cfg.loss.pack_len = pack_len or None
            model_cfg.arch.backbone_overrides.attn_backend = backend
        torch.manual_seed(args.seed)  # the same weights for every case
        model, loss = build_family(model_cfg, tok, image_tok, cfg.data.image_size)
        return training_step(model, lambda i: loss(model, batches[i % len(batches)], encode,
                                                   random.Random(i))["loss"],
                             cfg.optim.lr, bf16, "cpu")

    steps = {(p, b): make_step(p, b) for p in args.pack_len for b in args.backends}
    seconds = time_cases({str(k): s for k, s in steps.items()}, args.warmup, args.rounds,
                         torch.device("cpu"))
    print(f"{args.experiment}: batch {cfg.data.batch_size} documents, precision "
          f"{cfg.trainer.precision}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.rounds} round-robin steps\n")
    base = seconds[str((args.pack_len[0], args.backends[0]))]
    print("| pack_len | attn_backend | ms/step | vs first |")
    print("|---|---|---|---|")
    for (pack_len, backend) in steps:
        s = seconds[str((pack_len, backend))]
        print(f"| {pack_len or 'max_seq_len'} | {backend} | {1000 * s:.1f} | {s / base:.2f}x |")
