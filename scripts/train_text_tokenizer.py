"""Train the text tokenizer, a byte-level BPE with fusion's special tokens, on the texts of any
data source (the ``data`` group that training takes) and save ``<out>/tokenizer.json``.

    python scripts/train_text_tokenizer.py        # the shipped tokenizers/shapes-bpe
    python scripts/train_text_tokenizer.py data=folder data.root=/path/to/folder \
        out=tokenizers/my-bpe vocab_size=8000
    # then train with it: python scripts/train.py ... data.text_tokenizer=tokenizers/my-bpe

The texts are fusion.data.corpus.caption_corpus's: ShapesWorld's captions, descriptions and
edit instructions, or a folder's captions.jsonl captions and edits.jsonl instructions, read
from the index without opening an image (docs/text_tokenizer.md).
"""

import hydra
from omegaconf import DictConfig

from fusion.config import check_keys, register_configs
from fusion.data.corpus import caption_corpus
from fusion.data.text import train_bpe
from fusion.errors import report_user_errors

register_configs()


@hydra.main(config_path="../conf", config_name="train_text_tokenizer", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    check_keys(cfg)
    done = train_bpe(caption_corpus(cfg.data), cfg.out, cfg.vocab_size, cfg.min_frequency,
                     show_progress=cfg.show_progress)
    capped = "" if done.tokenizer.vocab_size >= cfg.vocab_size else (
        f" (of {cfg.vocab_size} asked: the texts ran out of pairs to merge at "
        f"min_frequency={cfg.min_frequency})")
    print(f"saved {done.path}: vocab {done.tokenizer.vocab_size}{capped}; {done.texts:,} texts "
          f"read in {done.seconds:.1f} s ({done.texts / done.seconds:,.0f} texts/s); "
          f"{done.mean_tokens:.2f} tokens per text on average"
          + (f" (over {done.sampled:,} drawn evenly)" if done.sampled < done.texts else ""))


if __name__ == "__main__":
    main()
