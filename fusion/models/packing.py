"""Pack documents into fixed-length rows and build the modality map (both families).

A document arrives as a list of pieces: ``list[int]`` token ids, or an :class:`ImageSlot` of
``n`` positions that the family fills with its own image representation (Transfusion: latent
patches, bidirectional among themselves). Chameleon's image codes are ordinary token ids and
attend causally, so its documents contain no slots.

Documents are packed greedily, in order, into rows of ``max_len`` (first fit: a document goes
into the first row with room), never split; packing only adds document ids to the modality
map, so documents in one row cannot see each other. Image slots are numbered in input order
(document, then position in the document) even when first fit places a later document in an
earlier row, so per-image tensors built in document order line up with the slots.

Shape legend: B = rows, S = max_len, I = image slots in the batch.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fusion.data.documents import ImageBatch
from fusion.models.attention import AttentionLayout


@dataclass
class SpecialIds:
    """The text tokenizer's special ids that a family needs (fusion.data.text)."""

    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int
    # CM3's <sentinel:i> and <eoss>: infilling markers that generated text never contains.
    cm3: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        return cls(tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id,
                   (*tok.sentinel_ids(), tok.eoss_id))


@dataclass(frozen=True)
class ImageSlot:
    n: int  # positions the image occupies (its patch tokens)


class Context(list):
    """Token ids that are model input but never a next-token target: an editing document's
    instruction when its loss is off, a Chameleon source image's codes (docs/editing.md).
    A ``list`` subclass, so :func:`pack` places it like any ids; :func:`target_mask` reads it.
    """


Piece = list[int] | ImageSlot


@dataclass
class Packed:
    ids: torch.Tensor  # (B, S) token ids; image and padding positions hold pad_id
    doc_ids: torch.Tensor  # (B, S) document id within the batch, -1 = padding
    image_ids: torch.Tensor  # (B, S) image slot index within the batch, -1 = not an image
    # Image slots, in input order (document, then position within it):
    image_rows: list[int]  # (I,) row of each image slot
    image_starts: list[int]  # (I,) first position of each image slot
    image_sizes: list[int]  # (I,) positions per image slot
    doc_of_image: list[int]  # (I,) which input document each slot came from

    def layout(self, device=None) -> AttentionLayout:
        return AttentionLayout(self.doc_ids.to(device, non_blocking=True),
                               self.image_ids.to(device, non_blocking=True))

    def pin_memory(self) -> Packed:
        return dataclasses.replace(self, ids=self.ids.pin_memory(),
                                   doc_ids=self.doc_ids.pin_memory(),
                                   image_ids=self.image_ids.pin_memory())

    @property
    def is_text(self) -> torch.Tensor:
        """(B, S) True at real token positions (not image, not padding)."""
        return (self.doc_ids >= 0) & (self.image_ids < 0)

    def next_token_targets(self, ignore_index: int = -100) -> torch.Tensor:
        """(B, S) target of each position: the next token in the same document when both
        this position and the next are text; ``ignore_index`` elsewhere.

        Positions inside an image predict nothing (the family adds EOI itself after an image),
        and the last text position before an image predicts BOI, which is how a model learns
        to start an image."""
        targets = torch.full_like(self.ids, ignore_index)
        text = self.is_text
        ok = text[:, :-1] & text[:, 1:] & (self.doc_ids[:, :-1] == self.doc_ids[:, 1:])
        targets[:, :-1] = torch.where(ok, self.ids[:, 1:], ignore_index)
        return targets


@dataclass(frozen=True)
class RowSpec:
    """What preparing a batch needs to know about the model: sizes and switches, never
    weights, so a preparer travels to loader workers cheaply (the family loss's
    ``rows(model)``)."""

    row_length: int  # positions per packed row
    image_positions: int  # positions per image: Transfusion patches, Chameleon codes
    text_vocab: int = 0  # Chameleon: the first image-code id
    reads_source: bool = False  # Chameleon: the model reads the aligned source code


@dataclass
class PreparedBatch:
    """A batch of documents made ready for a family's loss on the host: packed rows, the
    image tensors stacked in slot order, and every random draw that is not noise (caption
    and condition dropout, CM3 spans, clean-image choices). Loader workers build it
    (``DocumentDataModule(prepare=...)``), so the training process only encodes images,
    draws noise and runs the model. ``extras`` holds the family's own per-batch values."""

    packed: Packed
    images: ImageBatch
    num_documents: int
    predict: torch.Tensor | None = None  # (B, S) bool target_mask, None = every text target
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    # streamed data: where this rank's reader is after the batch (fusion.data.shards)
    stream_position: Any = None

    def __len__(self) -> int:
        return self.num_documents

    def pin_memory(self) -> PreparedBatch:
        """Page-locked copies of the tensors (DataLoader ``pin_memory``), so the copies to the
        GPU run asynchronously."""
        extras = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                  for k, v in self.extras.items()}
        return dataclasses.replace(
            self, packed=self.packed.pin_memory(), images=self.images.pin_memory(),
            predict=self.predict.pin_memory() if self.predict is not None else None,
            extras=extras)


@dataclass(frozen=True)
class BatchPreparer:
    """``prepare(documents, rng, rows) -> PreparedBatch`` bound to one model's
    :class:`RowSpec`: the callable a loader worker runs on each batch (picklable: a family
    loss's method and a few numbers)."""

    prepare: Callable[..., PreparedBatch]
    rows: RowSpec

    def __call__(self, documents: list, rng: random.Random) -> PreparedBatch:
        return self.prepare(documents, rng, self.rows)


def row_length(pack_len: int | None, max_seq_len: int) -> int:
    """The row length training packs into: ``pack_len`` (the family loss config's), or the
    model's ``max_seq_len`` when it is None. Rows longer than the model's positions are refused
    here, before any work."""
    if pack_len is None:
        return max_seq_len
    if not 0 < pack_len <= max_seq_len:
        raise ValueError(
            f"loss.pack_len={pack_len} must be between 1 and the model's max_seq_len={max_seq_len}"
        )
    return pack_len


def document_length(pieces: list[Piece]) -> int:
    return sum(p.n if isinstance(p, ImageSlot) else len(p) for p in pieces)


def pack(
    documents: list[list[Piece]], max_len: int, pad_id: int, one_per_row: bool = False
) -> Packed:
    """Pack documents into rows of ``max_len`` (see module docstring).

    ``one_per_row`` gives each document its own row (sampling and evaluation, where row i must
    be document i).
    """
    if not documents:
        raise ValueError("pack() needs at least one document")
    lengths = [document_length(d) for d in documents]
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(
                f"document {i} has {n} positions, more than max_len={max_len}; "
                "raise the row length (the model's max_seq_len, or loss.pack_len) or shorten "
                "the document"
            )
    placed: list[tuple[int, int]] = []  # (row, first position) of each document
    used: list[int] = []  # positions taken in each row
    for n in lengths:
        for r in [] if one_per_row else range(len(used)):
            if used[r] + n <= max_len:
                break
        else:
            r = len(used)
            used.append(0)
        placed.append((r, used[r]))
        used[r] += n
    B = len(used)
    # Rows are built as Python lists and become tensors once: a batch has thousands of pieces,
    # and a tensor write per piece costs more than the packing itself.
    ids = [[pad_id] * max_len for _ in range(B)]
    doc_ids = [[-1] * max_len for _ in range(B)]
    image_ids = [[-1] * max_len for _ in range(B)]
    rows, starts, sizes, owners = [], [], [], []
    # Documents are written in input order, whatever row first fit put them in, so image slot i
    # is the i-th image of the input: callers pair slots with per-image tensors (latents,
    # timesteps, condition flags) built in document order.
    for d, (r, start) in enumerate(placed):
        pos = start
        for piece in documents[d]:
            if isinstance(piece, ImageSlot):
                image_ids[r][pos : pos + piece.n] = [len(rows)] * piece.n
                rows.append(r)
                starts.append(pos)
                sizes.append(piece.n)
                owners.append(d)
                pos += piece.n
            else:
                ids[r][pos : pos + len(piece)] = piece
                pos += len(piece)
        doc_ids[r][start:pos] = [d] * (pos - start)
    return Packed(torch.tensor(ids, dtype=torch.long), torch.tensor(doc_ids, dtype=torch.long),
                  torch.tensor(image_ids, dtype=torch.long), rows, starts, sizes, owners)


def per_position(values: list[list[int]], packed: Packed, fill: int) -> torch.Tensor:
    """(B, S) int64: document d's ``values[d]`` (one per position, in order) at its packed
    positions, ``fill`` on padding. ``packed`` must be ``pack`` of documents of those lengths."""
    out = torch.full_like(packed.ids, fill)
    for d, doc_values in enumerate(values):
        where = packed.doc_ids == d
        if int(where.sum()) != len(doc_values):
            raise ValueError(f"document {d}: {len(doc_values)} values for "
                             f"{int(where.sum())} packed positions")
        out[where] = torch.tensor(doc_values, dtype=out.dtype)
    return out


def target_mask(documents: list[list[Piece]], packed: Packed) -> torch.Tensor | None:
    """(B, S) bool, False at positions holding :class:`Context` tokens, which must not be
    predicted; None when no document has any (every text token is then a target).

    ``packed`` must be ``pack(documents, ...)``: a document's positions are those with its
    document id, in order."""
    if not any(isinstance(p, Context) for doc in documents for p in doc):
        return None
    flags = [[int(not isinstance(p, Context)) for p in doc
              for _ in range(p.n if isinstance(p, ImageSlot) else len(p))] for doc in documents]
    return per_position(flags, packed, fill=1).bool()


def _slot_index(packed: Packed, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, position) indices of every image slot position, image by image: (I·N,)."""
    if len(set(packed.image_sizes)) > 1:
        raise ValueError("image slots of different sizes in one batch are not supported")
    n = packed.image_sizes[0]
    rows = torch.tensor(packed.image_rows, device=device).repeat_interleave(n)
    starts = torch.tensor(packed.image_starts, device=device).repeat_interleave(n)
    offsets = torch.arange(n, device=device).repeat(len(packed.image_sizes))
    return rows, starts + offsets


def scatter_images(hidden: torch.Tensor, packed: Packed, tokens: torch.Tensor) -> torch.Tensor:
    """Write per-image tokens (I, N, D) into their slots of ``hidden`` (B, S, D), out of place
    (so gradients reach both the text embeddings and the image tokens). Under autocast the
    patchifier's tokens may be bf16 while embeddings stay fp32; they take ``hidden``'s dtype."""
    if not packed.image_sizes:
        return hidden
    rows, cols = _slot_index(packed, hidden.device)
    return hidden.index_put((rows, cols), tokens.reshape(-1, tokens.shape[-1]).to(hidden.dtype))


def gather_images(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Read image slots out of ``hidden`` (B, S, D) -> (I, N, D)."""
    rows, cols = _slot_index(packed, hidden.device)
    return hidden[rows, cols].view(len(packed.image_sizes), packed.image_sizes[0], -1)


def next_token_loss(logits: torch.Tensor, packed: Packed, z_loss_weight: float = 0.0,
                    predict: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Both families' text loss: next-token cross-entropy on ``packed``'s text targets
    (logits (B, S, V)), plus Chameleon's z-loss (arXiv:2405.09818, sec. 2.3) when weighted.
    ``predict`` (B, S) bool (:func:`target_mask`) drops the targets whose token is False there.
    Returns ``{"lm_loss", ["z_loss"], "loss", "positions"}``; a family adds its own terms to
    ``loss``. ``positions``: the packed positions that are not padding (text and image), which
    the training module counts FLOPs on; it is not a loss and is not logged."""
    import torch.nn.functional as F

    from fusion.models.transformer import z_loss

    targets = packed.next_token_targets()
    if predict is not None:  # position p's target is the token at p + 1
        targets[:, :-1] = targets[:, :-1].masked_fill(~predict[:, 1:].to(targets.device), -100)
    targets = targets.to(logits.device)
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    out = {"lm_loss": lm, "loss": lm, "positions": (packed.doc_ids >= 0).sum()}
    if z_loss_weight:
        out["z_loss"] = z_loss(logits, z_loss_weight, mask=targets != -100)
        out["loss"] = lm + out["z_loss"]
    return out
