"""Train the ShapesWorld feature network for FID/KID and save it (the shipped
tokenizers/shapes-features): about three minutes on a 2-core CPU.

    python scripts/train_shapes_features.py --out tokenizers/shapes-features
"""

import argparse

from fusion.eval.features import SHAPES_FEATURES_DIR, train_shapes_features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=SHAPES_FEATURES_DIR)
    parser.add_argument("--steps", type=int, default=1500, help="schedule length")
    parser.add_argument("--max-seconds", type=float, default=170.0,
                        help="stop early after this long (the schedule still decays to here)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1, help="ShapesWorld seed to train on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    _, report = train_shapes_features(args.out, steps=args.steps, batch_size=args.batch_size,
                                      lr=args.lr, seed=args.seed, max_seconds=args.max_seconds,
                                      threads=args.threads)
    print(f"saved to {args.out}: " + ", ".join(f"{k}={v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
