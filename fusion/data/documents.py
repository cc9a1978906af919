"""Documents: the unit both families train on.

A :class:`Document` is an ordered list of segments, :class:`Text` (token ids) or :class:`Image`
(pixels), so interleaved documents are just longer lists. Each family turns a batch of
Documents into its own model inputs (Chameleon: one id stream; Transfusion: ids + latent
patches) together with the per-position modality map used by the attention mask.

Shape legend: C = 3 colour channels, H = W = image side.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from fusion.data.images import to_tensor
from fusion.data.sources import BadDataError, CaptionRecord, EditRecord
from fusion.data.text import TextTokenizer
from fusion.errors import UserError

log = logging.getLogger(__name__)

# Transfusion (Zhou et al. 2024, arXiv:2408.11039, sec. 4.1) puts the caption first for 80 % of
# image-caption pairs and the image first for the other 20 %.
DEFAULT_IMAGE_FIRST_RATIO = 0.2


@dataclass(frozen=True)
class Text:
    ids: tuple[int, ...]
    text: str = ""  # the source string, kept for logging and evaluation

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class Image:
    pixels: torch.Tensor  # (C, H, W) float in [-1, 1]; pre_encoded: the tokenizer's output
    # Editing: a source image is a condition and must never be noised (Transfusion) or used as a
    # loss target; generated/target images are.
    is_condition: bool = False
    # ``pixels`` already holds what the frozen image tokenizer's encode gives (VAE latents
    # (C, h, w) or VQ-GAN codes (h, w)), read from a pre-encoded dataset
    # (scripts/encode_dataset.py): training uses it as it is (encode_images).
    pre_encoded: bool = False


@dataclass
class ImageBatch:
    """A batch's images in order, stacked on the host (in a loader worker when the batch is
    prepared there): the pixels that the frozen tokenizer still has to encode, and the values
    read from a pre-encoded dataset (``Image.pre_encoded``), which training uses as they are.

    Shapes: ``pixels`` (F, C, H, W) of the images at ``fresh``; ``stored`` (P, ...) of those
    at ``stored_at``; F + P = ``count``."""

    count: int
    fresh: list[int]
    pixels: torch.Tensor | None
    stored_at: list[int]
    stored: torch.Tensor | None

    @classmethod
    def of(cls, images: Sequence[Image]) -> ImageBatch:
        fresh = [i for i, im in enumerate(images) if not im.pre_encoded]
        stored_at = [i for i, im in enumerate(images) if im.pre_encoded]
        return cls(len(images), fresh,
                   torch.stack([images[i].pixels for i in fresh]) if fresh else None,
                   stored_at, torch.stack([images[i].pixels for i in stored_at])
                   if stored_at else None)

    def pixels_of(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), C, H, W) pixels of the images at ``indices`` (not pre-encoded)."""
        row = {i: k for k, i in enumerate(self.fresh)}
        missing = [i for i in indices if i not in row]
        if missing:
            raise ValueError(f"images {missing} are pre-encoded: they carry no pixels")
        return self.pixels[[row[i] for i in indices]]

    def encode(self, encode, device) -> torch.Tensor:
        """(count, ...) on ``device``: ``encode`` (pixels (F, C, H, W) -> latents or codes)
        of the fresh images and the stored values, back in image order."""
        encoded = (encode(self.pixels.to(device, non_blocking=True))
                   if self.pixels is not None else None)
        if self.stored is None:
            return encoded
        dtype = encoded.dtype if encoded is not None else (
            torch.float32 if self.stored.is_floating_point() else torch.long)
        stored = self.stored.to(device=device, dtype=dtype, non_blocking=True)
        if encoded is None:
            return stored
        out = stored.new_empty((self.count, *stored.shape[1:]))
        out[self.fresh], out[self.stored_at] = encoded, stored
        return out

    def pin_memory(self) -> ImageBatch:
        pin = (lambda t: t.pin_memory() if t is not None else None)
        return ImageBatch(self.count, self.fresh, pin(self.pixels), self.stored_at,
                          pin(self.stored))


def encode_images(encode, images: Sequence[Image], device) -> torch.Tensor:
    """The frozen tokenizer's output for every image, in order, (I, ...) on ``device``
    (:meth:`ImageBatch.encode`): a pre-encoded image's stored tensor is used as it is, so
    training on an encoded dataset never runs the encoder."""
    return ImageBatch.of(images).encode(encode, device)


Segment = Text | Image


@dataclass(frozen=True)
class Document:
    segments: tuple[Segment, ...]

    @property
    def images(self) -> list[Image]:
        return [s for s in self.segments if isinstance(s, Image)]

    @property
    def texts(self) -> list[Text]:
        return [s for s in self.segments if isinstance(s, Text)]

    @property
    def is_edit(self) -> bool:
        """True when an image is a condition (an editing document's source)."""
        return any(isinstance(s, Image) and s.is_condition for s in self.segments)

    @property
    def order(self) -> str:
        """``caption_first`` / ``image_first`` / ``interleaved``, for logging and sampling."""
        kinds = ["image" if isinstance(s, Image) else "text" for s in self.segments]
        if kinds == ["text", "image"]:
            return "caption_first"
        if kinds == ["image", "text"]:
            return "image_first"
        return "interleaved"


@dataclass(frozen=True)
class TextLimit:
    """How many text tokens one document may carry: what is left of the family's packed row
    after its images and special tokens (``text_budget`` of the family's loss). ``truncate``
    cuts a longer text to fit (``data.truncate_captions``) instead of skipping its record."""

    max_tokens: int
    truncate: bool = False


def record_text(source, i: int) -> tuple[str, tuple[str, ...]]:
    """(key, texts) of record ``i`` of a source or a ``Subset`` of one, images not decoded."""
    while isinstance(source, Subset):
        source, i = source.dataset, source.indices[i]
    return source.text_of(i)


def fitting_records(source, tokenizer: TextTokenizer, limit: TextLimit | None,
                    max_bad_share: float = 1.0, where: str = "data",
                    texts_together: bool = False) -> list[int]:
    """The indices of ``source`` whose every text fits ``limit``, checked once when the data
    opens, so that a long caption is one skipped record instead of a crash mid-run.
    ``texts_together``: a record's texts all go into its one document (an interleaved story),
    so their sum must fit, and such a record is never cut, only skipped.

    Records that do not fit are skipped and counted with one warning line, or kept (to be cut
    when their document is built) when ``limit.truncate``. More than ``max_bad_share`` of the
    records skipped, or all of them, raises :class:`BadDataError`."""
    if limit is None:
        return list(range(len(source)))
    if limit.max_tokens < 1:
        raise BadDataError(f"{where}: a document has no room for text ({limit.max_tokens} "
                           "tokens left after its images); raise the row length "
                           "(model.arch max_seq_len or model.loss.pack_len)")
    def combine(lengths):
        return sum(lengths) if texts_together else max(lengths, default=0)

    truncate = limit.truncate and not texts_together
    keep, too_long = [], []
    for start in range(0, len(source), 4096):  # one tokenizer call per chunk of records
        records = [record_text(source, i) for i in range(start, min(start + 4096, len(source)))]
        lengths = iter(len(ids) for ids in tokenizer.encode_batch(
            [t for _, texts in records for t in texts]))
        for i, (key, texts) in enumerate(records, start):
            longest = combine([next(lengths) for _ in texts])
            if longest <= limit.max_tokens or truncate:
                keep.append(i)
            if longest > limit.max_tokens:
                too_long.append(f"{key} ({longest} tokens)")
    if too_long and truncate:
        log.warning("%s: %d record(s) have text longer than the %d tokens a document holds; "
                    "it is cut to fit (data.truncate_captions=true; first: %s)", where,
                    len(too_long), limit.max_tokens, ", ".join(too_long[:3]))
    elif too_long:
        log.warning("%s: skipped %d record(s) with text longer than the %d tokens a document "
                    "holds (first: %s); set data.truncate_captions=true to cut them instead",
                    where, len(too_long), limit.max_tokens, ", ".join(too_long[:3]))
        share = len(too_long) / max(1, len(source))
        if not keep or share > max_bad_share:
            raise BadDataError(
                f"{where}: {len(too_long)} of {len(source)} records have text longer than the "
                f"{limit.max_tokens} tokens a document holds ({share:.0%} > max_bad_share="
                f"{max_bad_share:.0%}; first: {'; '.join(too_long[:3])}); set "
                "data.truncate_captions=true, or raise the row length")
    return keep


def _text(tokenizer: TextTokenizer, text: str, limit: TextLimit | None) -> Text:
    ids = tokenizer.encode(text)
    if limit is not None and len(ids) > limit.max_tokens:
        ids = ids[:limit.max_tokens]  # only when limit.truncate: fitting_records skipped others
    return Text(tuple(ids), text)


def caption_document(tokenizer: TextTokenizer, image: torch.Tensor, caption: str,
                     image_first: bool, limit: TextLimit | None = None,
                     pre_encoded: bool = False) -> Document:
    text = _text(tokenizer, caption, limit)
    img = Image(image, pre_encoded=pre_encoded)
    return Document((img, text) if image_first else (text, img))


def edit_document(tokenizer: TextTokenizer, source: torch.Tensor, instruction: str,
                  target: torch.Tensor, limit: TextLimit | None = None) -> Document:
    """Editing triplet: source image (condition), instruction, target image."""
    return Document((Image(source, is_condition=True), _text(tokenizer, instruction, limit),
                     Image(target)))


def story_document(tokenizer: TextTokenizer, images: list[torch.Tensor], texts: list[str],
                   image_first: bool) -> Document:
    """An interleaved document: ``texts[k]`` then ``images[k]`` for each k (text first), or,
    ``image_first``, the first image before any text, then the first two texts as one ("...;
    ..."), then on as before: text about an image that came first, the reverse direction."""
    if len(images) != len(texts):
        raise ValueError(f"a story pairs each image with the text before it: {len(images)} "
                         f"images, {len(texts)} texts")
    if image_first and len(texts) > 1:
        texts = [f"{texts[0]}; {texts[1]}", *texts[2:]]
        segments = [Image(images[0])]
        for text, image in zip(texts, images[1:], strict=True):
            segments += [_text(tokenizer, text, None), Image(image)]
    elif image_first:  # one image: its text after it
        segments = [Image(images[0]), _text(tokenizer, texts[0], None)]
    else:
        segments = []
        for text, image in zip(texts, images, strict=True):
            segments += [_text(tokenizer, text, None), Image(image)]
    return Document(tuple(segments))


def caption_dropped(doc: Document, rng: random.Random, rate: float, edit: bool) -> bool:
    """Caption dropout, which classifier-free guidance needs (Ho & Salimans 2022,
    arXiv:2207.12598): whether a caption-first document trains without its caption, with
    probability ``rate`` (one draw from ``rng``). Editing documents (``edit``: they have
    :func:`drop_edit_conditions` instead) and image-first documents draw nothing."""
    return not edit and doc.order == "caption_first" and rng.random() < rate


def drop_edit_conditions(doc: Document, rng: random.Random, rate: float) -> Document:
    """Condition dropout for an editing document, as InstructPix2Pix trains for its two-scale
    classifier-free guidance (Brooks et al. 2023, arXiv:2211.09800, sec. 3.4): with
    probability ``rate`` each, drop the instruction, the source image, or both.

    What is left is exactly what the sampler's guidance streams feed: ``source, target``
    (image-only stream) and ``target`` alone (the unconditional ``<bos> <boi>`` stream, which
    text->image pre-training already taught). Documents without a condition image are returned
    unchanged. One draw from ``rng`` per editing document.
    """
    if not doc.is_edit or rate <= 0:
        return doc
    if not 0 <= 3 * rate <= 1:
        raise ValueError(f"edit condition dropout must be in [0, 1/3], got {rate}")
    u = rng.random()
    if u >= 3 * rate:
        return doc
    drop_text, drop_source = u < 2 * rate, u >= rate
    keep = [s for s in doc.segments
            if not (isinstance(s, Text) and drop_text)
            and not (isinstance(s, Image) and s.is_condition and drop_source)]
    return Document(tuple(keep))


class _Documents(Dataset):
    """Records of ``source`` that fit ``limit`` (:func:`fitting_records`), as Documents."""

    images_per_document = 1
    texts_together = False  # fitting_records' texts_together: all texts in one document

    def __init__(self, source, tokenizer: TextTokenizer, limit: TextLimit | None = None,
                 max_bad_share: float = 1.0, where: str = "data"):
        self.source, self.tokenizer, self.limit = source, tokenizer, limit
        self.indices = fitting_records(source, tokenizer, limit, max_bad_share, where,
                                       self.texts_together)

    def __len__(self) -> int:
        return len(self.indices)


class CaptionDocuments(_Documents):
    """(image, caption) records -> Documents, caption-first or image-first by a fixed ratio.

    The order is a deterministic function of (seed, record index), so a run is reproducible
    and every worker agrees.
    """

    def __init__(self, source, tokenizer: TextTokenizer,
                 image_first_ratio: float = DEFAULT_IMAGE_FIRST_RATIO, seed: int = 0,
                 limit: TextLimit | None = None, max_bad_share: float = 1.0,
                 where: str = "data"):
        if not 0.0 <= image_first_ratio <= 1.0:
            raise UserError(f"image_first_ratio must be in [0, 1], got {image_first_ratio}")
        super().__init__(source, tokenizer, limit, max_bad_share, where)
        self.image_first_ratio, self.seed = image_first_ratio, seed

    def image_first(self, i: int) -> bool:
        """Whether record ``i``'s document puts its image first (fixed by seed and index)."""
        return random.Random(f"order/{self.seed}/{i}").random() < self.image_first_ratio

    def __getitem__(self, j: int) -> Document:
        i = self.indices[j]
        rec: CaptionRecord = self.source[i]
        image_first = self.image_first(i)
        # image -> caption documents learn the full description when the source has one, so a
        # caption names every object's colour and class rather than one prompt template.
        text = (rec.description or rec.caption) if image_first else rec.caption
        return caption_document(self.tokenizer, to_tensor(rec.image), text, image_first,
                                self.limit)


def _overflows(tokenizer: TextTokenizer, text: str, limit: TextLimit | None) -> bool:
    """Whether ``text`` is longer than ``limit`` allows, when the limit does not truncate."""
    return (limit is not None and not limit.truncate
            and len(tokenizer.encode(text)) > limit.max_tokens)


class StreamCaptionDocument:
    """A streamed (image, caption) record -> its Document, or None when its text does not fit
    ``limit`` (a stream cannot check every record when it opens; it skips and counts the
    record instead). The order is fixed by (seed, the record's key), as
    :class:`CaptionDocuments` fixes it by index."""

    def __init__(self, tokenizer: TextTokenizer, limit: TextLimit | None,
                 image_first_ratio: float = DEFAULT_IMAGE_FIRST_RATIO, seed: int = 0):
        if not 0.0 <= image_first_ratio <= 1.0:
            raise UserError(f"image_first_ratio must be in [0, 1], got {image_first_ratio}")
        self.tokenizer, self.limit = tokenizer, limit
        self.image_first_ratio, self.seed = image_first_ratio, seed

    def __call__(self, rec: CaptionRecord) -> Document | None:
        image_first = (random.Random(f"order/{self.seed}/{rec.key}").random()
                       < self.image_first_ratio)
        text = (rec.description or rec.caption) if image_first else rec.caption
        limit = self.limit
        if _overflows(self.tokenizer, text, limit):
            return None
        if rec.encoded is not None:  # a pre-encoded dataset: the tokenizer's output as it is
            return caption_document(self.tokenizer, torch.from_numpy(rec.encoded), text,
                                    image_first, limit, pre_encoded=True)
        return caption_document(self.tokenizer, to_tensor(rec.image), text, image_first, limit)


class StreamEditDocument:
    """A streamed edit triplet (fusion.data.sources.EditRecord) -> its Document, or None when
    its instruction does not fit ``limit`` (as :class:`StreamCaptionDocument`)."""

    def __init__(self, tokenizer: TextTokenizer, limit: TextLimit | None):
        self.tokenizer, self.limit = tokenizer, limit

    def __call__(self, rec: EditRecord) -> Document | None:
        if _overflows(self.tokenizer, rec.instruction, self.limit):
            return None
        return edit_document(self.tokenizer, to_tensor(rec.source), rec.instruction,
                             to_tensor(rec.target), self.limit)


class EditDocuments(_Documents):
    """Edit triplet records -> Documents (source image, instruction, target image)."""

    images_per_document = 2

    def __getitem__(self, j: int) -> Document:
        rec: EditRecord = self.source[self.indices[j]]
        return edit_document(self.tokenizer, to_tensor(rec.source), rec.instruction,
                             to_tensor(rec.target), self.limit)


class StoryDocuments(CaptionDocuments):
    """Interleaved story records (fusion.data.sources.StoryRecord) -> Documents, text-first
    or image-first by a fixed ratio (as :class:`CaptionDocuments`). A story's texts all go
    into its one document, so their sum is checked against the row."""

    texts_together = True

    def __getitem__(self, j: int) -> Document:
        i = self.indices[j]
        rec = self.source[i]
        image_first = self.image_first(i)
        return story_document(self.tokenizer, [to_tensor(x) for x in rec.images],
                              list(rec.texts), image_first)


def collate_documents(batch: list[Document]) -> list[Document]:
    """Documents stay a list: each family packs them into tensors its own way."""
    return list(batch)
