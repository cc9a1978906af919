"""Text tokenizer: byte-level BPE through HF ``tokenizers``.

All special tokens are defined here, once. Both families use the same ids for them:

* ``<pad>`` padding, never a loss target;
* ``<bos>`` / ``<eos>`` document start / end;
* ``<boi>`` / ``<eoi>`` image span start / end (Chameleon and Transfusion both wrap images);
* ``<eoss>`` end of a CM3 masked span, and ``<sentinel:i>`` the CM3 span placeholders
  (Aghajanyan et al. 2022, arXiv:2201.07520).

Special tokens take the first ids (0, 1, 2, ...) in every BPE trained here
(:func:`train_bpe`; ``scripts/train_text_tokenizer.py`` on any data source), so that they are
stable across corpora. A pretrained ``tokenizer.json`` (a Llama-3 one, say) keeps its own ids;
the special tokens it lacks are appended at the end of its vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from fusion.errors import UserError

log = logging.getLogger(__name__)

PAD, BOS, EOS, BOI, EOI, EOSS = "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<eoss>"
NUM_SENTINELS = 8


def sentinel(i: int) -> str:
    return f"<sentinel:{i}>"


SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, BOI, EOI, EOSS) + tuple(
    sentinel(i) for i in range(NUM_SENTINELS))
CHAMELEON_IMAGE_TOKEN = re.compile(r"^IMGIMG([A-J]+)Z$")
# A converted checkpoint's special token whose part one of fusion's own tokens took (its row
# included), renamed by fusion.convert.chameleon: ``<s>`` -> ``<retired:<s>>``.
RETIRED_TOKEN = re.compile(r"^<retired:.+>$")
BYTE_ALPHABET = 256  # byte-level BPE: every byte is a token before any merge


def check_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE holds at least the 256 bytes and fusion's special tokens."""
    least = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < least:
        raise UserError(f"vocab_size must be >= {least} for byte-level BPE (the "
                        f"{BYTE_ALPHABET}-byte alphabet plus fusion's {len(SPECIAL_TOKENS)} "
                        f"special tokens), got {vocab_size}")


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
        check_vocab_size(vocab_size)
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

    def chameleon_image_tokens(self) -> dict[int, int]:
        """id -> VQ code of Meta Chameleon's in-vocabulary image tokens (``IMGIMG``, the code's
        decimal digits as the letters A-J, ``Z``); empty for any other tokenizer. A Chameleon
        model converted from Meta's (fusion.convert.chameleon) keeps these ids as text ids that
        are never generated: their rows moved to fusion's code range."""
        out = {}
        for name, i in self._tok.get_vocab(with_added_tokens=True).items():
            match = CHAMELEON_IMAGE_TOKEN.match(name)
            if match:
                out[i] = int("".join(str(ord(c) - ord("A")) for c in match.group(1)))
        return out

    def never_generated_ids(self) -> list[int]:
        """Text ids a model reading this tokenizer never generates: Chameleon's in-vocabulary
        image tokens (:meth:`chameleon_image_tokens`) and the retired tokens of a converted
        checkpoint (``<retired:...>``). A retired token shares its row with the fusion token
        that replaced it, so the two would tie in every logit; greedy decoding would pick the
        lower id, the retired one, which ends nothing."""
        retired = [i for name, i in self._tok.get_vocab(with_added_tokens=True).items()
                   if RETIRED_TOKEN.match(name)]
        return sorted([*self.chameleon_image_tokens(), *retired])

    def id_of(self, token: str) -> int | None:
        """Any token's id (None when the vocabulary lacks it)."""
        return self._tok.token_to_id(token)

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
    """Every caption, description and edit instruction ShapesWorld produces for some scenes
    (the shipped BPE's corpus; any data source's: fusion.data.corpus.caption_corpus)."""
    from fusion.data.corpus import shapes_texts

    return shapes_texts(num_scenes, seed, size)


@dataclass
class TrainedBPE:
    """What :func:`train_bpe` made and measured."""

    tokenizer: TextTokenizer
    path: Path  # the saved tokenizer.json (card.json beside it)
    texts: int  # texts read
    mean_tokens: float  # tokens per text, over ``sampled`` of them drawn evenly
    sampled: int  # all the texts, or ``sample_size`` of them when there are more
    seconds: float  # reading the texts and training, saving excluded
    card: dict


class _Tally:
    """Counts the texts that pass and keeps an even random sample of ``sample_size`` of them
    (reservoir sampling, Li's algorithm L: a random draw only per kept text, not per text)."""

    def __init__(self, sample_size: int, seed: int = 0):
        self.count, self.sample_size = 0, sample_size
        self.sample: list[str] = []
        self._rng = random.Random(seed)
        self._w = 1.0
        self._next = sample_size - 1  # index of the next text to keep once the sample is full
        self._skip()

    def _skip(self) -> None:
        rng, k = self._rng, self.sample_size
        self._w *= math.exp(math.log(1.0 - rng.random()) / k)
        if self._w >= 1.0:  # underflow guard: keep the next one
            self._next += 1
            return
        gap = math.log(1.0 - rng.random()) / math.log1p(-self._w)
        self._next += int(min(gap, 2**62)) + 1

    def watch(self, texts: Iterable[str]) -> Iterator[str]:
        k, sample = self.sample_size, self.sample
        for text in texts:
            if self.count < k:
                sample.append(text)
            elif self.count == self._next:
                sample[self._rng.randrange(k)] = text
                self._skip()
            self.count += 1
            yield text


def train_bpe(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
              min_frequency: int = 2, description: str | None = None,
              show_progress: bool = True, sample_size: int = 10000) -> TrainedBPE:
    """Train the byte-level BPE with fusion's special tokens on ``corpus`` (read once, as a
    stream, with a progress bar over texts) and save ``tokenizer.json`` plus a provenance
    ``card.json`` in ``out_dir``. ``description`` says what the corpus is (default: its
    ``description`` attribute, as :class:`fusion.data.corpus.Corpus` has)."""
    check_vocab_size(vocab_size)  # before a single text is read
    description = description or getattr(corpus, "description", "texts")
    tally = _Tally(sample_size)
    texts = tqdm(tally.watch(corpus), desc="texts", unit=" texts", disable=not show_progress,
                 smoothing=0.1)
    start = time.perf_counter()
    try:
        tok = TextTokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  show_progress=False)
    finally:
        texts.close()
    seconds = time.perf_counter() - start
    if tally.count == 0:
        raise UserError(f"no texts to train the text tokenizer on ({description})")
    lengths = [len(ids) for ids in tok.encode_batch(tally.sample)]
    mean_tokens = sum(lengths) / len(lengths)
    path = tok.save(out_dir)
    card = {"corpus": description, "texts": tally.count,
            "requested_vocab_size": vocab_size, "vocab_size": tok.vocab_size,
            "min_frequency": min_frequency,
            "mean_tokens_per_text": round(mean_tokens, 3), "texts_measured": len(lengths),
            "special_tokens": list(SPECIAL_TOKENS)}
    (path.parent / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return TrainedBPE(tok, path, tally.count, mean_tokens, len(lengths), seconds, card)


def train_shapes_tokenizer(out_dir: str | Path, vocab_size: int = 512, num_scenes: int = 20000,
                           seed: int = 0, min_frequency: int = 2,
                           show_progress: bool = True) -> tuple[TextTokenizer, Path]:
    """Train the ShapesWorld BPE and save ``tokenizer.json`` plus a provenance ``card.json``."""
    from fusion.config import DataConfig
    from fusion.data.corpus import caption_corpus

    corpus = caption_corpus(DataConfig(source="shapes", num_train=num_scenes, seed=seed))
    done = train_bpe(corpus, out_dir, vocab_size, min_frequency, show_progress=show_progress)
    return done.tokenizer, done.path
