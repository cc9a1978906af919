"""Stage 1.5: encode a dataset once with the frozen image tokenizer, so that training never
runs its encoder (fusion.training.pre_encode; docs/data.md).

    python scripts/encode_dataset.py --shards '/data/mine/*.tar' \
        --image-tokenizer tokenizers/shapes-vae --out /data/mine-vae
    python scripts/encode_dataset.py --folder /path/to/folder --image-tokenizer ... --out ...
    # then: python scripts/train.py ... data=shards 'data.shards=/data/mine-vae/*.tar' \
    #     image_tokenizer=tokenizers/shapes-vae

Writes shards of the captions with the VAE's latents (latent.npy) or the VQ-GAN's codes
(codes.npy) and encoding.json (the tokenizer's fingerprint, checked when training starts).
"""

import argparse

from fusion.errors import report_user_errors
from fusion.training.pre_encode import encode_dataset


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="image shards: a glob or a brace pattern")
    source.add_argument("--folder", help="a users' folder: images + captions.jsonl")
    parser.add_argument("--image-tokenizer", required=True, help="a stage-1 artifact folder")
    parser.add_argument("--out", required=True, help="an empty folder for the encoded shards")
    parser.add_argument("--size", type=int, default=64, help="image size (data.image_size)")
    parser.add_argument("--resize", default="center_crop")
    parser.add_argument("--caption-key", default="txt", help="shards: txt or json.<field>")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-bad-share", type=float, default=0.1)
    args = parser.parse_args(argv)
    info = encode_dataset(args.out, args.image_tokenizer, shards=args.shards,
                          folder=args.folder, size=args.size, resize=args.resize,
                          caption_key=args.caption_key, shard_size=args.shard_size,
                          batch_size=args.batch_size, device=args.device,
                          max_bad_share=args.max_bad_share)
    print(f"encoded {info['samples']} images to {args.out}: {info['member']} "
          f"{info['dtype']} {tuple(info['shape'])} each (image tokenizer {args.image_tokenizer}, "
          f"sha256 {info['image_tokenizer_sha256'][:12]}...)")
    return info


if __name__ == "__main__":
    main()
