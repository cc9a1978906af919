"""Text corpora: every training text of a data source, for the text tokenizer's BPE.

:func:`caption_corpus` turns a data config (``conf/data/*.yaml``, the same ``data=...``
that training takes) into a stream of texts, read without decoding a single image:

* ``data.source=shapes`` -- for ShapesWorld scenes ``0 .. data.num_train-1`` (seed
  ``data.seed``): every caption among ``data.caption_tags`` (all when null), the full
  description, and the edit instruction (of ``data.edit_kinds``, cycled as
  :class:`~fusion.data.sources.ShapesEditSource` does); with ``data.documents=story`` also the
  story texts. With the default config this is exactly the corpus of the shipped
  ``tokenizers/shapes-bpe``.
* ``data.source=folder`` -- ``data.root``'s JSON-lines indexes, read line by line: the
  ``caption`` of each ``captions.jsonl`` row and the ``instruction`` of each ``edits.jsonl``
  row, whichever of the two the folder holds (both when it has both: one tokenizer serves the
  caption model and its editing fine-tune, which must share it). Images are not opened, so a
  row whose image is missing or broken (which training skips) still gives its text, and the
  held-out ``data.val_share`` of the folder is read too; ``data.val_root`` is not.

New sources plug in at :data:`CORPORA`: ``data.source`` -> a function of the data config
that returns a :class:`Corpus`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fusion.config import DataConfig, resolve_path
from fusion.data.shapes import EDIT_KINDS, ShapesWorld
from fusion.errors import UserError

log = logging.getLogger(__name__)


class Corpus(Iterator[str]):
    """An iterator over texts that also says where they come from (``description``, written
    into the tokenizer's ``card.json``)."""

    def __init__(self, texts: Iterable[str], description: str):
        self._texts = iter(texts)
        self.description = description

    def __next__(self) -> str:
        return next(self._texts)


def caption_corpus(cfg: DataConfig) -> Corpus:
    """Every training text of the source ``cfg`` configures (see the module docstring).

    Configuration mistakes (an unknown source, a missing folder or index) fail here, before
    any text is read; a source that turns out to hold no text fails at the end of the stream.
    """
    try:
        make = CORPORA[cfg.source]
    except KeyError:
        raise UserError(f"unknown data.source {cfg.source!r} for a text corpus; expected one "
                        f"of {sorted(CORPORA)}") from None
    return make(cfg)


# --------------------------------------------------------------------------------------------
# ShapesWorld
# --------------------------------------------------------------------------------------------
def shapes_texts(num_scenes: int, seed: int = 0, size: int = 64,
                 caption_tags: Iterable[str] | None = None,
                 edit_kinds: Iterable[str] | None = None) -> Iterator[str]:
    """Scene by scene: its captions among ``caption_tags`` (all when None) and its
    description, then its edit instruction. Nothing is rendered."""
    tags = set(caption_tags) if caption_tags else None
    kinds = tuple(edit_kinds) if edit_kinds else None
    world = ShapesWorld(seed=seed, size=size)
    for i in range(num_scenes):
        captions, _ = world.captions(i)
        yield from (text for tag, text in captions.items()
                    if tags is None or tag in tags or tag == "description")
        yield world.edit(i, kinds[i % len(kinds)] if kinds else None).instruction


def _story_texts(source) -> Iterator[str]:
    for i in range(len(source)):
        yield from source.text_of(i)[1]


def shapes_corpus(cfg: DataConfig) -> Corpus:
    if cfg.num_train < 1:
        raise UserError(f"data.num_train={cfg.num_train}: no ShapesWorld scenes to read "
                        "texts from")
    bad = [k for k in cfg.edit_kinds or () if k not in EDIT_KINDS]
    if bad:
        raise UserError(f"unknown data.edit_kinds {bad}; expected some of {EDIT_KINDS}")
    texts: Iterable[str] = shapes_texts(cfg.num_train, cfg.seed, cfg.image_size,
                                        cfg.caption_tags, cfg.edit_kinds)
    what = "captions, descriptions and edit instructions"
    if cfg.caption_tags:
        what += f" (caption tags {list(cfg.caption_tags)})"
    if cfg.edit_kinds:
        what += f" (edit kinds {list(cfg.edit_kinds)})"
    if cfg.documents == "story":
        from fusion.data.sources import ShapesStorySource  # imports torch: only when asked

        stories = ShapesStorySource(cfg.num_train, seed=cfg.seed, size=cfg.image_size,
                                    images_per_story=tuple(cfg.story_images))
        texts = itertools.chain(texts, _story_texts(stories))
        what += ", stories"
    return Corpus(texts, f"ShapesWorld seed={cfg.seed}, scenes 0..{cfg.num_train - 1}: {what}")


# --------------------------------------------------------------------------------------------
# Users' folders
# --------------------------------------------------------------------------------------------
# index file -> the field of each row that holds its text (fusion.data.sources' layout)
FOLDER_INDEXES: dict[str, str] = {"captions.jsonl": "caption", "edits.jsonl": "instruction"}


def _index_texts(root: Path, indexes: list[Path], max_bad_share: float) -> Iterator[str]:
    """The text field of every row of ``indexes``, streamed line by line. Bad lines are
    skipped and counted (one warning per kind, after the last line); no text at all, or more
    than ``max_bad_share`` bad lines, is refused as a training run would refuse the folder."""
    problems: dict[str, list[str]] = defaultdict(list)
    total = good = 0
    for index in indexes:
        field = FOLDER_INDEXES[index.name]
        with index.open("rb") as fh:  # decoded line by line: one bad byte spoils one line
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                total += 1
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    problems["line that is not UTF-8"].append(f"{index.name}:{n}")
                    continue
                except json.JSONDecodeError:
                    problems["malformed JSON line"].append(f"{index.name}:{n}")
                    continue
                text = row.get(field) if isinstance(row, dict) else None
                if not isinstance(text, str) or not text.strip():
                    problems[f"missing or empty {field}"].append(f"{index.name}:{n}")
                    continue
                good += 1
                yield text.strip()
    bad = total - good
    for kind, keys in problems.items():
        log.warning("%s: skipped %d line(s) with %s (first: %s)", root, len(keys), kind,
                    ", ".join(keys[:3]))
    names = " and ".join(p.name for p in indexes)
    if good == 0:
        raise UserError(f"{root}: no captions to train a text tokenizer on: {names} "
                        f"hold{'s' if len(indexes) == 1 else ''} {total} line(s), "
                        f"{bad} of them bad")
    if bad / total > max_bad_share:
        first = [f"{k} ({kind})" for kind, keys in problems.items() for k in keys][:5]
        raise UserError(f"{root}: {bad} of {total} lines of {names} are bad ({bad / total:.0%}"
                        f" > data.max_bad_share={max_bad_share:.0%}); first bad: "
                        + "; ".join(first))


def folder_corpus(cfg: DataConfig) -> Corpus:
    if not cfg.root:
        raise UserError("data.source=folder needs data.root=/path/to/folder")
    root = resolve_path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    indexes = [root / name for name in FOLDER_INDEXES if (root / name).is_file()]
    if not indexes:
        raise UserError(f"{root}: no captions to train a text tokenizer on: the folder has "
                        'neither captions.jsonl ({"file": ..., "caption": ...} per line) nor '
                        'edits.jsonl ({"source", "instruction", "target"} per line)')
    fields = ", ".join(f"{FOLDER_INDEXES[p.name]}s of {p.name}" for p in indexes)
    return Corpus(_index_texts(root, indexes, cfg.max_bad_share), f"{root}: {fields}")


# --------------------------------------------------------------------------------------------
# Tar shards
# --------------------------------------------------------------------------------------------
def shards_corpus(cfg: DataConfig) -> Corpus:
    """The caption member (``data.caption_key``) of every sample of ``data.shards``; image
    members are not read (fusion.data.shards.shard_captions)."""
    from fusion.data.shards import expand_shards, shard_captions

    if not cfg.shards:
        raise UserError("data.source=shards needs data.shards=<list, glob or brace pattern>")
    paths = expand_shards(cfg.shards)

    def texts() -> Iterator[str]:
        n = 0
        for text in shard_captions(paths, cfg.caption_key):
            n += 1
            yield text
        if n == 0:
            raise UserError(f"{len(paths)} shard(s) ({paths[0]} ...) hold no caption under "
                            f"data.caption_key={cfg.caption_key}")

    return Corpus(texts(), f"{len(paths)} shard(s) from {paths[0]}: {cfg.caption_key}")


# data.source -> its corpus. A new source adds its entry here.
CORPORA: dict[str, Callable[[DataConfig], Corpus]] = {
    "shapes": shapes_corpus,
    "folder": folder_corpus,
    "shards": shards_corpus,
}
