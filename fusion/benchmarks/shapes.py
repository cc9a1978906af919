"""ShapesWorld throughput: scenes rendered (and detected) per second on one core."""

from __future__ import annotations

import argparse
import time

from fusion.data.shapes import ShapesWorld, detect


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.py shapes", description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num", type=int, default=5000, help="scenes per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of N")
    args = parser.parse_args(argv)
    world = ShapesWorld(seed=0, size=args.size)
    images = [world.image(i) for i in range(min(args.num, 1000))]
    rows = [
        ("scene sampling", lambda i: world.scene(i), args.num),
        ("scene + render", lambda i: world.image(i), args.num),
        ("sample (render + captions)", lambda i: world.sample(i), args.num),
        ("detect", lambda i: detect(images[i % len(images)]), min(args.num, 1000)),
    ]
    print(f"ShapesWorld {args.size}x{args.size}, single process (one core), best of "
          f"{args.repeats}\n")
    print("| operation | images/s |\n|---|---|")
    for name, fn, n in rows:
        best = max(_rate(fn, n) for _ in range(args.repeats))
        print(f"| {name} | {best:,.0f} |")


if __name__ == "__main__":
    main()
