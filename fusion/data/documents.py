"""Documents: the unit both families train on.

A :class:`Document` is an ordered list of segments, :class:`Text` (token ids) or :class:`Image`
(pixels), so interleaved documents are just longer lists. Each family turns a batch of
Documents into its own model inputs (Chameleon: one id stream; Transfusion: ids + latent
patches) together with the per-position modality map used by the attention mask.

Shape legend: C = 3 colour channels, H = W = image side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from fusion.data.images import to_tensor
from fusion.data.sources import CaptionRecord, EditRecord
from fusion.data.text import TextTokenizer

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
    pixels: torch.Tensor  # (C, H, W) float in [-1, 1]
    # Editing: a source image is a condition and must never be noised (Transfusion) or used as a
    # loss target; generated/target images are.
    is_condition: bool = False


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


def caption_document(tokenizer: TextTokenizer, image: torch.Tensor, caption: str,
                     image_first: bool) -> Document:
    text = Text(tuple(tokenizer.encode(caption)), caption)
    img = Image(image)
    return Document((img, text) if image_first else (text, img))


def edit_document(tokenizer: TextTokenizer, source: torch.Tensor, instruction: str,
                  target: torch.Tensor) -> Document:
    """Editing triplet: source image (condition), instruction, target image."""
    return Document((Image(source, is_condition=True),
                     Text(tuple(tokenizer.encode(instruction)), instruction),
                     Image(target)))


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


class CaptionDocuments(Dataset):
    """(image, caption) records -> Documents, caption-first or image-first by a fixed ratio.

    The order is a deterministic function of (seed, index), so a run is reproducible and every
    worker agrees.
    """

    def __init__(self, source, tokenizer: TextTokenizer,
                 image_first_ratio: float = DEFAULT_IMAGE_FIRST_RATIO, seed: int = 0):
        if not 0.0 <= image_first_ratio <= 1.0:
            raise ValueError(f"image_first_ratio must be in [0, 1], got {image_first_ratio}")
        self.source, self.tokenizer = source, tokenizer
        self.image_first_ratio, self.seed = image_first_ratio, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Document:
        rec: CaptionRecord = self.source[i]
        image_first = random.Random(f"order/{self.seed}/{i}").random() < self.image_first_ratio
        # image -> caption documents learn the full description when the source has one, so a
        # caption names every object's colour and class rather than one prompt template.
        text = (rec.description or rec.caption) if image_first else rec.caption
        return caption_document(self.tokenizer, to_tensor(rec.image), text, image_first)


class EditDocuments(Dataset):
    """Edit triplet records -> Documents (source image, instruction, target image)."""

    def __init__(self, source, tokenizer: TextTokenizer):
        self.source, self.tokenizer = source, tokenizer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Document:
        rec: EditRecord = self.source[i]
        return edit_document(self.tokenizer, to_tensor(rec.source), rec.instruction,
                             to_tensor(rec.target))


def collate_documents(batch: list[Document]) -> list[Document]:
    """Documents stay a list: each family packs them into tensors its own way."""
    return list(batch)
