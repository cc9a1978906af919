"""Convert other projects' checkpoints into fusion's formats (docs/pretrained.md).

    # a Hugging Face Chameleon / Anole folder -> a Chameleon-family model folder
    python scripts/convert.py chameleon --hf /ckpt/chameleon-7b-hf --out models/chameleon-7b \
        --vqgan /ckpt/chameleon/tokenizer/vqgan.ckpt --vqgan-config /ckpt/chameleon/tokenizer/vqgan.yaml
    # a taming-transformers VQ-GAN alone -> a fusion image tokenizer
    python scripts/convert.py vqgan --checkpoint vqgan.ckpt --config vqgan.yaml --out tokenizers/chameleon-vqgan

A Llama-family LLM needs no conversion: `python scripts/train.py init_backbone=<hf folder> ...`
reads it as it is. Everything is read from local files; nothing is downloaded.
"""

import argparse
import logging

from fusion.errors import UserError, report_user_errors


@report_user_errors
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    cham = kinds.add_parser("chameleon", help="a Hugging Face Chameleon folder")
    cham.add_argument("--hf", required=True, help="ChameleonForConditionalGeneration folder")
    cham.add_argument("--out", required=True, help="the fusion model folder to write")
    cham.add_argument("--vqgan", help="Meta's taming-style VQ-GAN checkpoint (its decoder)")
    cham.add_argument("--vqgan-config", help="the YAML beside that checkpoint")
    vq = kinds.add_parser("vqgan", help="a taming-transformers VQ-GAN")
    vq.add_argument("--checkpoint", required=True, help=".ckpt or .safetensors state dict")
    vq.add_argument("--config", required=True, help="its YAML (model.params.ddconfig, ...)")
    vq.add_argument("--out", required=True, help="the fusion image-tokenizer folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.kind == "chameleon":
        from fusion.convert.chameleon import convert_chameleon

        if bool(args.vqgan) != bool(args.vqgan_config):
            raise UserError("--vqgan and --vqgan-config go together (the checkpoint and its "
                            "YAML)")
        vqgan = (args.vqgan, args.vqgan_config) if args.vqgan else None
        out = convert_chameleon(args.hf, args.out, vqgan)
        print(f"wrote {out}: python scripts/sample.py model_dir={out}, or fine-tune with "
              f"python scripts/train.py experiment=edit_chameleon_pretrained init_from={out}")
    else:
        from fusion.convert.taming import read_taming_vqgan, vqgan_from_taming

        settings, state = read_taming_vqgan(args.checkpoint, args.config)
        tok = vqgan_from_taming(state, settings["ddconfig"], settings["embed_dim"],
                                settings["n_embed"], info={"converted_from": args.checkpoint})
        out = tok.save_pretrained(args.out)
        print(f"wrote {args.out}")
    return str(out)


if __name__ == "__main__":
    main()
