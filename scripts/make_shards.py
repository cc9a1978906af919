"""Write tar shards (the img2dataset / webdataset layout `data=shards` streams) from a users'
folder or from ShapesWorld.

    python scripts/make_shards.py --folder /path/to/folder --out /data/mine --shard-size 1000
    python scripts/make_shards.py --folder /path/to/folder --edits --out /data/edits
    python scripts/make_shards.py --shapes 20000 --out data/shapes-shards --shard-size 2000

A folder's image files go in as they are (not re-encoded), each with its caption as
`<key>.txt`; edit triplets as `<key>.source.<ext>`, `<key>.target.<ext>` and the instruction as
`<key>.txt`. ShapesWorld scenes are PNGs with `<key>.txt` and a `<key>.json` holding the caption
and the full description. Then: `python scripts/train.py data=shards 'data.shards=/data/mine/*.tar'`
(add `data.documents=edit` for triplets).
"""

import argparse

from fusion.data.export import write_shards
from fusion.errors import UserError, report_user_errors


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="a users' folder: images + captions.jsonl")
    source.add_argument("--shapes", type=int, metavar="N", help="N ShapesWorld scenes")
    parser.add_argument("--out", required=True, help="an empty folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--edits", action="store_true", help="the folder's edits.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="ShapesWorld seed")
    parser.add_argument("--size", type=int, default=64, help="ShapesWorld image size")
    parser.add_argument("--start", type=int, default=0, help="first ShapesWorld scene")
    args = parser.parse_args(argv)
    if args.edits and not args.folder:
        raise UserError("--edits reads a folder's edits.jsonl; give --folder")
    try:
        counts = write_shards(args.out, args.shard_size, folder=args.folder, edits=args.edits,
                              num_images=args.shapes or 0, seed=args.seed, size=args.size,
                              start=args.start)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise UserError(str(err)) from err
    skipped = counts["skipped"]
    note = (f"; skipped {len(skipped)} bad row(s): malformed, without text or naming a "
            f"missing file (first: {', '.join(skipped[:3])})" if skipped else "")
    print(f"wrote {counts['samples']} samples in {counts['shards']} shard(s) to {args.out}{note}")
    return counts


if __name__ == "__main__":
    main()
