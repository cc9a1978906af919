"""Text tokenizer: byte-level BPE through HF ``tokenizers``.

All special tokens are defined here, once. Both families use the same ids for them:

* ``<pad>`` padding, never a loss target;
* ``<bos>`` / ``<eos>`` document start / end;
* ``<boi>`` / ``<eoi>`` image span start / end (Chameleon and Transfusion both wrap images);
* ``<eoss>`` end of a CM3 masked span, and ``<sentinel:i>`` the CM3 span placeholders
  (Aghajanyan et al. 2022, arXiv:2201.07520).

Special tokens take the first ids (0, 1, 2, ...) so that they are stable across tokenizers
trained on different corpora.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

PAD, BOS, EOS, BOI, EOI, EOSS = "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<eoss>"
NUM_SENTINELS = 8


def sentinel(i: int) -> str:
    return f"<sentinel:{i}>"


SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, BOI, EOI, EOSS) + tuple(
    sentinel(i) for i in range(NUM_SENTINELS))


class TextTokenizer:
    """A byte-level BPE tokenizer with fusion's special tokens.

    Build one with :meth:`train` (from an iterable of strings) or :meth:`from_file` (any local
    ``tokenizer.json``; fusion's special tokens are added when it lacks them).
    """

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            log.warning("tokenizer lacks %d of fusion's special tokens (%s...); adding them at "
                        "the end of its vocabulary", len(missing), missing[0])
            tokenizer.add_special_tokens(missing)
        self._tok = tokenizer
        self.special_ids: dict[str, int] = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = 512, min_frequency: int = 2,
              show_progress: bool = True) -> TextTokenizer:
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for byte-level "
                             f"BPE with {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid HF tokenizer.json: {err}") from err
        return cls(tok)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (what :meth:`save` writes)."""
        return self._tok.to_str(pretty=True)

    def save(self, path: str | Path) -> Path:
        """Save to ``path`` (a ``.json`` file, or a folder that gets ``tokenizer.json``)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path), pretty=True)
        return path

    # -- use ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        return self.special_ids[token]

    pad_id = property(lambda self: self.special_ids[PAD])
    bos_id = property(lambda self: self.special_ids[BOS])
    eos_id = property(lambda self: self.special_ids[EOS])
    boi_id = property(lambda self: self.special_ids[BOI])
    eoi_id = property(lambda self: self.special_ids[EOI])
    eoss_id = property(lambda self: self.special_ids[EOSS])

    def sentinel_ids(self) -> list[int]:
        return [self.special_ids[sentinel(i)] for i in range(NUM_SENTINELS)]

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def shapes_corpus(num_scenes: int = 20000, seed: int = 0, size: int = 64) -> Iterable[str]:
    """Every caption, description and edit instruction ShapesWorld produces for some scenes."""
    from fusion.data.shapes import ShapesWorld

    world = ShapesWorld(seed=seed, size=size)
    for i in range(num_scenes):
        sample = world.sample(i)
        yield from sample.captions.values()
        yield world.edit(i).instruction


def train_shapes_tokenizer(out_dir: str | Path, vocab_size: int = 512, num_scenes: int = 20000,
                           seed: int = 0, min_frequency: int = 2,
                           show_progress: bool = True) -> tuple[TextTokenizer, Path]:
    """Train the ShapesWorld BPE and save ``tokenizer.json`` plus a provenance ``card.json``."""
    tok = TextTokenizer.train(shapes_corpus(num_scenes, seed), vocab_size=vocab_size,
                              min_frequency=min_frequency, show_progress=show_progress)
    path = tok.save(out_dir)
    card = {"corpus": f"ShapesWorld seed={seed}, scenes 0..{num_scenes - 1}: captions, "
                      "descriptions and edit instructions",
            "requested_vocab_size": vocab_size, "vocab_size": tok.vocab_size,
            "special_tokens": list(SPECIAL_TOKENS)}
    (path.parent / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return tok, path
