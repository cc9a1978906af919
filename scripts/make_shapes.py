"""Export ShapesWorld to a folder: images + captions.jsonl (+ edits.jsonl) + GenEval prompts.

    python scripts/make_shapes.py --out data/shapes --num-images 2000 --num-edits 200

The folder is in the layout `data=folder data.root=...` reads, so it doubles as a template for
bringing your own data.
"""

import argparse

from fusion.data.export import export_shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--num-edits", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--start", type=int, default=0, help="first scene index")
    args = parser.parse_args(argv)
    counts = export_shapes(args.out, args.num_images, seed=args.seed, size=args.size,
                           start=args.start, num_edits=args.num_edits)
    print(f"wrote {counts['images']} images, {counts['edits']} edits and {counts['prompts']} "
          f"GenEval-format prompts to {args.out}")


if __name__ == "__main__":
    main()
