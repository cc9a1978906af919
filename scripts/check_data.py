"""Check a data folder before a long run: counts good and bad records, names the problems.

    python scripts/check_data.py /path/to/folder [--edits] [--size 64] [--max-bad-share 0.1]
"""

import argparse
import logging

from fusion.data.sources import BadDataError, CaptionFolder, EditFolder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--edits", action="store_true", help="check edits.jsonl triplets")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--resize", default="center_crop")
    parser.add_argument("--max-bad-share", type=float, default=0.1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    kind = EditFolder if args.edits else CaptionFolder
    try:
        folder = kind(args.root, size=args.size, resize=args.resize,
                      max_bad_share=args.max_bad_share)
    except BadDataError as err:
        print(f"REFUSED: {err}")
        return 1
    print(f"{args.root}: {len(folder)} good record(s), {folder.num_bad} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
