"""Check a data folder or tar shards before a long run: counts good and bad records (per
shard for shards), names the problems, and checks every caption's length against the row of
the recipe you will train.

    python scripts/check_data.py /path/to/folder [--edits] [--experiment transfusion_tiny]
        [--truncate] [--size 64] [--max-bad-share 0.1] [--no-length-check]
    python scripts/check_data.py --shards '/data/cc/{00000..00099}.tar' [--caption-key txt]
        [--edits]
"""

import argparse
import logging

from fusion.config import compose, resolve_path
from fusion.data.documents import TextLimit, fitting_records
from fusion.data.sources import BadDataError, CaptionFolder, EditFolder
from fusion.data.text import TextTokenizer
from fusion.errors import UserError, report_user_errors


def text_limit(experiment: str, n_images: int, truncate: bool) -> TextLimit:
    """The text budget of a document in ``experiment``'s packed rows (what training checks)."""
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", [f"experiment={experiment}"])
    tokenizer = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    model, loss = build_family(cfg.model, tokenizer, load_image_tokenizer(cfg.image_tokenizer),
                               cfg.data.image_size)
    return TextLimit(loss.text_budget(model, n_images), truncate)


def check_shards(args) -> int:
    """Every shard read and decoded: counts per shard, the problems named, and (unless
    --no-length-check) the captions against the recipe's rows. 1 when refused."""
    from fusion.data.shards import check_shard, expand_shards

    good, bad, too_long, total = 0, 0, [], 0
    limit = None if args.no_length_check else text_limit(args.experiment,
                                                         2 if args.edits else 1, args.truncate)
    tokenizer = None if limit is None else TextTokenizer.from_file(resolve_path(
        compose("train", [f"experiment={args.experiment}"]).data.text_tokenizer))
    for path in expand_shards(args.shards):
        captions, problems = check_shard(path, args.caption_key, args.size, args.resize,
                                         kind="edit" if args.edits else "caption")
        n_bad = sum(len(v) for v in problems.values())
        note = "; ".join(f"{len(v)} {kind} (first: {v[0]})" for kind, v in problems.items())
        print(f"{path}: {len(captions)} good, {n_bad} bad" + (f": {note}" if note else ""))
        good, bad = good + len(captions), bad + n_bad
        if tokenizer is not None:
            lengths = [len(x) for x in tokenizer.encode_batch(captions)] if captions else []
            too_long += [f"{path} ({n} tokens)" for n in lengths if n > limit.max_tokens]
    total = good + bad
    print(f"{args.shards}: {good} good sample(s), {bad} skipped")
    if limit is not None:
        verb = "cut to fit" if limit.truncate else "skipped"
        print(f"{len(too_long)} {'instruction' if args.edits else 'caption'}(s) longer than the {limit.max_tokens} text tokens of "
              f"{args.experiment}'s rows would be {verb}"
              + (f" (first: {', '.join(too_long[:3])})" if too_long else ""))
    if total == 0 or bad / total > args.max_bad_share:
        print(f"REFUSED: {bad} of {total} samples are bad (max_bad_share={args.max_bad_share})")
        return 1
    return 0


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", help="a users' folder")
    parser.add_argument("--shards", help="tar shards instead: a glob or a brace pattern")
    parser.add_argument("--caption-key", default="txt", help="shards: txt or json.<field>")
    parser.add_argument("--edits", action="store_true",
                        help="edit triplets: a folder's edits.jsonl, or shards of triplets")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--resize", default="center_crop")
    parser.add_argument("--max-bad-share", type=float, default=0.1)
    parser.add_argument("--experiment", default="transfusion_tiny",
                        help="the recipe (conf/experiment/) whose rows the texts must fit")
    parser.add_argument("--truncate", action="store_true",
                        help="as data.truncate_captions=true: long texts are cut, not skipped")
    parser.add_argument("--no-length-check", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if bool(args.root) == bool(args.shards):
        raise UserError("give a folder or --shards, one of them")
    if args.shards:
        return check_shards(args)
    kind = EditFolder if args.edits else CaptionFolder
    try:
        folder = kind(args.root, size=args.size, resize=args.resize,
                      max_bad_share=args.max_bad_share)
        print(f"{args.root}: {len(folder)} good record(s), {folder.num_bad} skipped")
        if not args.no_length_check:
            limit = text_limit(args.experiment, 2 if args.edits else 1, args.truncate)
            tokenizer = TextTokenizer.from_file(
                resolve_path(compose("train", [f"experiment={args.experiment}"])
                             .data.text_tokenizer))
            kept = fitting_records(folder, tokenizer, limit, args.max_bad_share, str(args.root))
            print(f"{args.root}: {len(kept)} record(s) fit {args.experiment}'s rows (at most "
                  f"{limit.max_tokens} text tokens a document)")
    except BadDataError as err:
        print(f"REFUSED: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
