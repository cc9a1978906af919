"""Backbone training-step throughput: plain causal attention vs the mixed-modal mask.

    python scripts/bench.py transformer                      # CPU defaults: tiny, small
    python scripts/bench.py transformer --configs 350m       # CUDA: bf16, compiled, + flex

Each case times forward + backward of `Transformer` on random input embeddings:
    causal       one text document per row: SDPA `is_causal=True`, no mask tensor
    mixed/sdpa   half the positions in two images per row: SDPA with the dense boolean mask,
                 query-tiled in eager mode (`AttentionLayout.sdpa_tiles`)
    mixed/flex   the same layout through compiled FlexAttention (CUDA only)
Cases are timed round-robin and the median step is reported, so slow drift of a shared
machine hits every case alike. FLOPs per token follow `flops_per_token` (6·N + causal
attention), the same count for every case, so "vs causal" is a pure time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fusion.models.attention import AttentionLayout, layout_from_segments
from fusion.models.transformer import (
    TRANSFORMER_PRESETS,
    Transformer,
    count_parameters,
    flops_per_token,
    transformer_config,
)

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 dense tensor cores (NVIDIA datasheet)
DEFAULT_SHAPES = {  # device -> {config: (batch, seq)}: CPU sizes keep each config ~20 s on 2 cores
    "cpu": {"tiny": (2, 512), "small": (2, 256)},
    "cuda": {"350m": (8, 2048)},
}


@dataclass
class Case:
    name: str
    layout: AttentionLayout
    backend: str


def mixed_layout(batch: int, seq: int, device: torch.device, query_tile: int) -> AttentionLayout:
    """Text, image, text, image, text with the two images covering half of every row."""
    image, text = seq // 4, seq // 8
    row = [
        (0, "text", text),
        (0, "image", image),
        (0, "text", text),
        (0, "image", image),
        (0, "text", seq - 2 * image - 2 * text),
    ]
    return replace(layout_from_segments([row] * batch, device=device), query_tile=query_tile)


def cases_for(batch: int, seq: int, device: torch.device, query_tile: int) -> list[Case]:
    causal = layout_from_segments([[(0, "text", seq)]] * batch, device=device)
    assert causal.is_plain_causal
    mixed = mixed_layout(batch, seq, device, query_tile)
    cases = [Case("causal", causal, "sdpa"), Case("mixed/sdpa", mixed, "sdpa")]
    if device.type == "cuda":
        cases.append(Case("mixed/flex", mixed, "flex"))
    return cases


def make_step(
    model: Transformer,
    layout: AttentionLayout,
    x: torch.Tensor,
    autocast: contextlib.AbstractContextManager,
) -> Callable[[], None]:
    def step() -> None:
        with autocast:
            loss = model(x, layout).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def build_model(
    name: str, seq: int, backend: str, seed: int, device: torch.device, compile_blocks: bool
) -> Transformer:
    """Same seed, same weights: models that differ only in backend are comparable."""
    cfg = transformer_config(
        name, attn_backend=backend, max_seq_len=max(seq, TRANSFORMER_PRESETS[name]["max_seq_len"])
    )
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    if compile_blocks:
        for layer in model.layers:
            layer.compile()
    return model


def time_cases(
    steps: dict[str, Callable[[], None]], warmup: int, rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step of each case, timed round-robin."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py transformer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(TRANSFORMER_PRESETS),
        help="presets (default: tiny small on CPU, 350m on CUDA)",
    )
    parser.add_argument("--batch", type=int, help="batch size (default per config, printed)")
    parser.add_argument("--seq", type=int, help="sequence length (default per config, printed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, help="untimed steps per case (default 2 CPU, 5 CUDA)")
    parser.add_argument("--rounds", type=int, help="timed steps per case (default 10 CPU, 20 CUDA)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], help="bf16 = autocast (default on CUDA)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile every block (default on CUDA)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help=f"peak for MFU (default on CUDA: {H100_BF16_DENSE_TFLOPS}, H100 SXM bf16)",
    )
    parser.add_argument(
        "--query-tile",
        type=int,
        default=AttentionLayout.query_tile,
        help="SDPA query tile of the mixed layout (>= seq: one untiled masked call)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    defaults = DEFAULT_SHAPES["cuda" if cuda else "cpu"]
    configs = args.configs or list(defaults)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    use_compile = cuda if args.compile is None else args.compile
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if cuda else None)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    rounds = args.rounds or (20 if cuda else 10)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    print(
        f"device={device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, dtype={dtype}, compile={use_compile}, "
        f"warmup={warmup}, rounds={rounds}, query_tile={args.query_tile}\n"
    )
    header = "| config | params | B×S | attention | ms/step | tokens/s | TFLOP/s | vs causal |"
    print(header + (" MFU |" if peak else ""))
    print("|---" * (8 + bool(peak)) + "|")
    for name in configs:
        batch, seq = defaults.get(name, (args.batch, args.seq))
        batch, seq = args.batch or batch, args.seq or seq
        if batch is None or seq is None:
            raise SystemExit(
                f"{name} has no default shape on {device.type}: pass --batch and --seq"
            )
        cases = cases_for(batch, seq, device, args.query_tile)
        models = {
            backend: build_model(name, seq, backend, args.seed, device, use_compile)
            for backend in {c.backend for c in cases}
        }
        model = models["sdpa"]
        x = torch.randn(batch, seq, model.cfg.d_model, device=device)
        steps = {c.name: make_step(models[c.backend], c.layout, x, autocast) for c in cases}
        seconds = time_cases(steps, warmup, rounds, device)
        n_params = count_parameters(model)
        flops = flops_per_token(model.cfg, seq, n_params) * batch * seq
        for case in cases:
            t = seconds[case.name]
            row = (
                f"| {name} | {n_params / 1e6:.1f} M | {batch}×{seq} | {case.name} | {t * 1e3:.1f} "
                f"| {batch * seq / t:,.0f} | {flops / t / 1e12:.3g} | {t / seconds['causal']:.2f}× |"
            )
            print(row + (f" {flops / t / 1e12 / peak:.1%} |" if peak else ""), flush=True)
        del models, model, x, steps


if __name__ == "__main__":
    main()
