"""Record sources: where (image, caption) pairs and edit triplets come from.

Three kinds share one interface (``len``, ``[i]`` -> record, and ``text_of(i)`` -> the record's
key and texts without decoding its images, for the length check of
:func:`fusion.data.documents.fitting_records`):

* :class:`ShapesSource` -- ShapesWorld, generated on the fly (:class:`ShapesEditSource`: its
  edit triplets; :class:`ShapesStorySource`: its interleaved stories);
* :class:`CaptionFolder` / :class:`EditFolder` -- a user's folder of images plus a JSON-lines
  index, in the layout ``scripts/make_shapes.py`` also writes::

      folder/captions.jsonl   {"file": "0001.png", "caption": "a red circle"}   one per line
      folder/edits.jsonl      {"source": "a.png", "instruction": "...", "target": "b.png"}

Bad input never stops a run and is never silent. Every record is checked once when the folder
is opened (the image is fully decoded, so truncated files are caught): bad ones are skipped and
counted, with one warning line per kind of problem. If more than ``max_bad_share`` of the
records are bad the folder is refused with an error naming the first few.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from fusion.data.images import fit, to_rgb
from fusion.data.shapes import ShapesWorld, render
from fusion.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionRecord:
    image: np.ndarray  # (S, S, 3) uint8
    caption: str  # the prompt for text -> image
    key: str = ""  # where it came from, for messages
    # The caption to learn for image -> text. ShapesWorld gives its full description (every
    # object's colour and class); folders have one caption for both directions.
    description: str | None = None
    # A pre-encoded record (fusion.data.shards): the frozen image tokenizer's output instead of
    # decoded pixels (``image`` is then None): VAE latents (C, h, w) or VQ-GAN codes (h, w).
    encoded: np.ndarray | None = None


@dataclass(frozen=True)
class EditRecord:
    source: np.ndarray  # (S, S, 3) uint8
    instruction: str
    target: np.ndarray  # (S, S, 3) uint8
    key: str = ""


@dataclass(frozen=True)
class StoryRecord:
    """An interleaved document's content: ``texts[k]`` comes just before ``images[k]``."""

    images: tuple[np.ndarray, ...]  # (S, S, 3) uint8 each
    texts: tuple[str, ...]
    key: str = ""


class BadDataError(UserError):
    """Too much of a data folder is unusable."""


# --------------------------------------------------------------------------------------------
# ShapesWorld
# --------------------------------------------------------------------------------------------
class ShapesSource:
    """``num_samples`` ShapesWorld scenes starting at ``offset``, each with one caption.

    The caption is drawn (deterministically per index) from the GenEval-style prompts that the
    scene satisfies and its full description, restricted to ``caption_tags``.
    """

    def __init__(self, num_samples: int, seed: int = 0, size: int = 64, offset: int = 0,
                 caption_tags: tuple[str, ...] | None = None):
        self.world = ShapesWorld(seed=seed, size=size)
        self.num_samples, self.offset = num_samples, offset
        self.caption_tags = tuple(caption_tags) if caption_tags else None

    def __len__(self) -> int:
        return self.num_samples

    def _caption(self, i: int, captions: dict[str, str]) -> str:
        options = [c for tag, c in captions.items()
                   if self.caption_tags is None or tag in self.caption_tags]
        if not options:
            options = [captions["description"]]
        return random.Random(f"caption-choice/{self.world.seed}/{self.offset + i}").choice(options)

    def __getitem__(self, i: int) -> CaptionRecord:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        sample = self.world.sample(self.offset + i)
        return CaptionRecord(sample.image, self._caption(i, sample.captions),
                             key=f"shapes:{self.offset + i}",
                             description=sample.captions["description"])

    def text_of(self, i: int) -> tuple[str, tuple[str, ...]]:
        """(key, every text record ``i`` can put in a document), without rendering."""
        captions, _ = self.world.captions(self.offset + i)
        return f"shapes:{self.offset + i}", (self._caption(i, captions),
                                             captions["description"])


class ShapesEditSource:
    """ShapesWorld edit triplets (recolour, move, add, remove), rendered."""

    def __init__(self, num_samples: int, seed: int = 0, size: int = 64, offset: int = 0,
                 kinds: tuple[str, ...] | None = None):
        self.world = ShapesWorld(seed=seed, size=size)
        self.num_samples, self.offset = num_samples, offset
        self.kinds = tuple(kinds) if kinds else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> EditRecord:
        idx = self.offset + i
        kind = self.kinds[i % len(self.kinds)] if self.kinds else None
        edit = self.world.edit(idx, kind)
        return EditRecord(render(edit.source), edit.instruction, render(edit.target),
                          key=f"shapes-edit:{idx}")

    def text_of(self, i: int) -> tuple[str, tuple[str, ...]]:
        kind = self.kinds[i % len(self.kinds)] if self.kinds else None
        return f"shapes-edit:{self.offset + i}", (self.world.edit(self.offset + i,
                                                                  kind).instruction,)


class ShapesStorySource:
    """ShapesWorld stories (:meth:`fusion.data.shapes.ShapesWorld.story`), rendered: a scene
    and ``images - 1`` edits of it in a row, ``images`` cycling through ``images_per_story``.
    Scenes hold at most ``max_objects`` objects, so that three images and their texts fit one
    row of the tiny recipes."""

    def __init__(self, num_samples: int, seed: int = 0, size: int = 64, offset: int = 0,
                 images_per_story: tuple[int, ...] = (2, 3), max_objects: int = 3):
        if not images_per_story or min(images_per_story) < 1 or max(images_per_story) > 4:
            raise UserError(f"data.story_images must hold image counts from 1 to 4, got "
                            f"{list(images_per_story)}")
        self.world = ShapesWorld(seed=seed, size=size, max_objects=max_objects)
        self.num_samples, self.offset = num_samples, offset
        self.images_per_story = tuple(images_per_story)

    def __len__(self) -> int:
        return self.num_samples

    def story(self, i: int):
        """The :class:`~fusion.data.shapes.ShapesStory` of record ``i`` (not rendered)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return self.world.story(self.offset + i,
                                self.images_per_story[i % len(self.images_per_story)])

    def __getitem__(self, i: int) -> StoryRecord:
        story = self.story(i)
        return StoryRecord(tuple(render(s) for s in story.scenes), story.texts,
                           key=f"shapes-story:{self.offset + i}")

    def text_of(self, i: int) -> tuple[str, tuple[str, ...]]:
        return f"shapes-story:{self.offset + i}", self.story(i).texts


# --------------------------------------------------------------------------------------------
# Users' folders
# --------------------------------------------------------------------------------------------
class _Problems:
    """Bad records grouped by kind of problem, for one warning line per kind."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, key: str) -> None:
        self.by_kind[kind].append(key)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_kind.values())

    def report(self, where: Path, total: int, max_bad_share: float) -> None:
        for kind, keys in self.by_kind.items():
            log.warning("%s: skipped %d record(s) with %s (first: %s)", where, len(keys), kind,
                        ", ".join(keys[:3]))
        if total == 0:
            raise BadDataError(f"{where}: no records found")
        if self.count / total > max_bad_share:
            first = [f"{k} ({kind})" for kind, keys in self.by_kind.items() for k in keys][:5]
            raise BadDataError(
                f"{where}: {self.count} of {total} records are bad "
                f"({self.count / total:.0%} > max_bad_share={max_bad_share:.0%}); first bad: "
                + "; ".join(first))


def _load_image(path: Path, size: int, policy: str) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # decodes fully: truncated files fail here, not mid-training
        return np.asarray(fit(to_rgb(img), size, policy))


def _check_image(folder: Path, name: object, problems: _Problems, key: str) -> Path | None:
    if not isinstance(name, str) or not name.strip():
        problems.add("missing file name", key)
        return None
    path = folder / name
    if not path.is_file():
        problems.add("missing image file", f"{key} {name}")
        return None
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        problems.add("unreadable, truncated or non-image file", f"{key} {name}")
        return None
    return path


def _read_jsonl(index: Path, problems: _Problems) -> list[tuple[str, dict]]:
    if not index.is_file():
        raise FileNotFoundError(f"index file not found: {index}")
    rows = []
    with index.open("rb") as fh:  # decoded line by line: one bad byte spoils one record
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            key = f"{index.name}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.add("line that is not UTF-8", key)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                problems.add("malformed JSON line", key)
                continue
            if not isinstance(row, dict):
                problems.add("malformed JSON line", key)
                continue
            rows.append((key, row))
    return rows


class _Folder:
    """Shared machinery: read the index, validate each row once, report, keep the good ones."""

    index_name = ""

    def __init__(self, root: str | Path, size: int = 64, resize: str = "center_crop",
                 max_bad_share: float = 0.1, index_name: str | None = None,
                 show_progress: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        fit(Image.new("RGB", (2, 2)), 2, resize)  # validates the policy name early
        self.size, self.resize = size, resize
        index = self.root / (index_name or self.index_name)
        problems = _Problems()
        rows = _read_jsonl(index, problems)
        self.records = []
        for key, row in tqdm(rows, desc=f"checking {index.name}", disable=not show_progress,
                             leave=False):
            rec = self._validate(row, problems, key)
            if rec is not None:
                self.records.append(rec)
        unparsed = sum(len(problems.by_kind.get(k, []))
                       for k in ("malformed JSON line", "line that is not UTF-8"))
        problems.report(index, len(rows) + unparsed, max_bad_share)
        self.num_bad = problems.count

    def _validate(self, row: dict, problems: _Problems, key: str):
        raise NotImplementedError

    def _image(self, path: Path) -> np.ndarray:
        return _load_image(path, self.size, self.resize)

    def __len__(self) -> int:
        return len(self.records)


class CaptionFolder(_Folder):
    """A folder of images with ``captions.jsonl`` rows ``{"file": ..., "caption": ...}``."""

    index_name = "captions.jsonl"

    def _validate(self, row: dict, problems: _Problems, key: str):
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            problems.add("missing or empty caption", key)
            return None
        path = _check_image(self.root, row.get("file"), problems, key)
        return None if path is None else (path, caption.strip())

    def __getitem__(self, i: int) -> CaptionRecord:
        path, caption = self.records[i]
        return CaptionRecord(self._image(path), caption, key=str(path))

    def text_of(self, i: int) -> tuple[str, tuple[str, ...]]:
        path, caption = self.records[i]
        return str(path), (caption,)


class EditFolder(_Folder):
    """A folder of images with ``edits.jsonl`` rows ``{"source", "instruction", "target"}``."""

    index_name = "edits.jsonl"

    def _validate(self, row: dict, problems: _Problems, key: str):
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            problems.add("missing or empty instruction", key)
            return None
        src = _check_image(self.root, row.get("source"), problems, key)
        if src is None:
            return None
        tgt = _check_image(self.root, row.get("target"), problems, key)
        return None if tgt is None else (src, instruction.strip(), tgt)

    def __getitem__(self, i: int) -> EditRecord:
        src, instruction, tgt = self.records[i]
        return EditRecord(self._image(src), instruction, self._image(tgt), key=str(src))

    def text_of(self, i: int) -> tuple[str, tuple[str, ...]]:
        src, instruction, _ = self.records[i]
        return str(src), (instruction,)

