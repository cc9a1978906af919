"""Train the byte-level BPE on ShapesWorld text and save it (the shipped tokenizers/shapes-bpe).

    python scripts/train_text_tokenizer.py --out tokenizers/shapes-bpe
"""

import argparse

from fusion.data.text import train_shapes_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tokenizers/shapes-bpe")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--num-scenes", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok, path = train_shapes_tokenizer(args.out, args.vocab_size, args.num_scenes, args.seed)
    print(f"saved {tok} to {path}")


if __name__ == "__main__":
    main()
