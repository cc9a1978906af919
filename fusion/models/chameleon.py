"""Chameleon family: image codes in the text vocabulary, one autoregressive model.

Chameleon Team 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation Models"
(arXiv:2405.09818). A VQ-GAN turns an image into h·w discrete codes; the codes are offset into
the same vocabulary as the text BPE, so a document is one id stream

    <bos> text ... <boi> code × (h·w) <eoi> text ... <eos>

trained with next-token prediction (plus the CM3 objective, ``fusion.models.cm3``) with causal
attention everywhere. Stability switches from the paper (sec. 2.3): QK-norm, z-loss 1e-5.

Vocabulary layout: ids [0, text_vocab) are the text tokenizer's (its special tokens first),
ids [text_vocab, text_vocab + codebook) are image codes.

Editing documents ``<bos> <boi> source codes <eoi> instruction <boi> target codes <eoi> <eos>``
(docs/editing.md): by default only the target span ``<boi> codes <eoi>`` is predicted (the
source codes and instruction are context, ``edit_loss="target"``); ``edit_loss="all"``
predicts every token. They never get CM3, and their conditions are dropped
InstructPix2Pix-style (``fusion.data.documents.drop_edit_conditions``) for two-scale guidance.

Image positions: the backbone's RoPE is 1-D over the sequence, so a code knows how far back
its neighbours are but not which cell of the h×w grid it fills, and an edit's target code sits
at a distance from its source cell that changes with the instruction's length. With
``image_pos_embed`` the model adds a learned 2-D (row + column) embedding of the cell to every
image code's token embedding, as Transfusion's linear patchifier does for patches
(``fusion.models.positions``). Cells come from :func:`image_cells` (in-place images) or, in
training, from the code placeholders (:func:`slot_cells`), which CM3 moves with their spans.

Source alignment (editing): a target code that copies its source cell must find that cell
somewhere ~100 positions back. With ``source_alignment`` each position of the target span also
receives the source's code at the cell that position predicts (the target's ``<boi>`` predicts
cell 0, its code at cell k predicts cell k + 1), through a learned projection of that code's
token embedding that starts at zero, so an unchanged cell is copied from the input at hand and
attention is left to the instruction and the changed cells. This is the autoregressive form of
what Transfusion gets from its patch grid: a target patch sits at the same 2-D position as its
source patch. It is fusion's addition, not in the Chameleon paper (which does not edit).

Copying the source (editing, ``source_copy``): even so, the LM head has to turn that input back
into one of ~1,000 code ids, and a few wrong copies per image derail the cells after them
(docs/results.md, "Image editing": a copy gate for Chameleon). A pointer-generator output
(See et al. 2017, arXiv:1704.04368) makes the copy a single learned gate:
p = g·onehot(aligned source code) + (1 - g)·softmax(logits), so the logits only have to model
the changed cells (also fusion's).

Code digits (``code_digit_levels``): an FSQ code (Mentzer et al. 2023, arXiv:2309.15505) is a
tuple of digits, one per quantised channel, and the LM head's 1,000 code rows share nothing
between codes that differ in one digit. A second, factorised head scores each digit value
(L = sum of the levels outputs) and adds to each code's logit the scores of its digits, so
log p(code) gains a term that generalises across codes (fusion's addition, after the
factorised per-digit outputs that the FSQ paper suggests for its codes' autoregressive models).

Shape legend: B = rows, S = positions, D = d_model, V = text_vocab + codebook,
h/w = code grid, K = codebook, L = sum of the FSQ levels.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion.data.documents import (
    Document,
    Image,
    ImageBatch,
    Text,
    caption_dropped,
    drop_edit_conditions,
)
from fusion.models.attention import AttentionLayout
from fusion.models.cm3 import CM3_POSITIONS_PER_SPAN, CM3Tokens, cm3_apply, cm3_spans
from fusion.models.packing import (
    BatchPreparer,
    Context,
    PreparedBatch,
    RowSpec,
    SpecialIds,
    next_token_loss,
    pack,
    per_position,
    row_length,
    target_mask,
)
from fusion.models.positions import GridPositionEmbedding
from fusion.models.schemas import (
    EDIT_LOSSES,
    EDIT_TARGET_CODES,
    ChameleonConfig,
    ChameleonLossConfig,
)
from fusion.models.transformer import KVCache, Transformer, transformer_config


def image_cells(ids: torch.Tensor, boi: int, text_vocab: int) -> torch.Tensor:
    """ids (..., S) -> (..., S) int64: the grid cell of each image code (k for the k-th code
    after the latest ``<boi>``, row-major), -1 at every other position.

    Valid for images written in place (no CM3 span moved out of one); CM3 documents carry
    their cells through the transform instead (ChameleonLoss)."""
    is_code = ids >= text_vocab
    count = is_code.long().cumsum(-1)
    at_boi = torch.where(ids == boi, count, 0).cummax(-1).values
    return torch.where(is_code, count - at_boi - 1, -1)


# A batch prepared in a loader worker (ChameleonLoss.prepare) does not know its codes yet: code j
# of the batch's image k stands in its stream as CODE_SLOT - (k·N + j), N codes per image, and
# the training process fills them in (fill_codes) once the VQ-GAN has encoded the images. CM3
# moves the placeholders like any id, so each one still names its image and cell.
CODE_SLOT = -2


def code_slots(image: int, n: int) -> list[int]:
    """The N placeholder ids of the batch's ``image``-th image, cell by cell."""
    return list(range(CODE_SLOT - image * n, CODE_SLOT - (image + 1) * n, -1))


def fill_codes(ids: torch.Tensor, code_ids: torch.Tensor | None) -> torch.Tensor:
    """``ids`` (...) with every placeholder replaced by its code's id in the unified vocabulary
    (``code_ids`` (I·N,): the batch's codes, image by image, offset by ``text_vocab``)."""
    slot = ids <= CODE_SLOT
    if code_ids is None:
        if slot.any():
            raise ValueError("code placeholders without encoded images")
        return ids
    return torch.where(slot, code_ids[(CODE_SLOT - ids).clamp(min=0)], ids)


def slot_cells(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(...) grid cell of each placeholder (its index within its image), -1 elsewhere."""
    return torch.where(ids <= CODE_SLOT, (CODE_SLOT - ids) % n, -1)


def source_alignment(ids: list[int], boi: int, eoi: int, text_vocab: int) -> list[int]:
    """One document's ids (S,) -> (S,): at the ``<boi>`` and codes of its second image, the
    first image's code (an id of the unified vocabulary) at the cell that position predicts
    (``<boi>`` -> cell 0, the code at cell k -> cell k + 1); -1 everywhere else, including the
    last code (it predicts ``<eoi>``). A document with fewer than two images, or whose first
    image is not closed by ``<eoi>``, is all -1. A prefix of a document works the same way.
    Code placeholders (:func:`code_slots`) count as codes and are copied as they are."""
    out = [-1] * len(ids)
    bois = [i for i, t in enumerate(ids) if t == boi]
    if len(bois) < 2:
        return out
    end = bois[0] + 1
    while end < len(ids) and (ids[end] >= text_vocab or ids[end] <= CODE_SLOT):
        end += 1
    if end >= len(ids) or ids[end] != eoi:
        return out
    source, start = ids[bois[0] + 1:end], bois[1]
    for k in range(min(len(source), len(ids) - start)):
        out[start + k] = source[k]
    return out


def code_digits(levels: Sequence[int]) -> torch.Tensor:
    """(L, K) 0/1 map from FSQ digit values to the codes that have them, K = prod(levels):
    row ``offset_d + v`` marks the codes whose digit d is v. Digits are mixed-radix with the
    first level fastest, vector-quantize-pytorch's ``FSQ`` index order."""
    codes = torch.arange(math.prod(levels))
    rows, basis = [], 1
    for n in levels:
        digit = (codes // basis) % n  # (K,)
        rows.append(F.one_hot(digit, n).T)  # (n, K)
        basis *= n
    return torch.cat(rows).float()


def local_edit_codes(source_codes: torch.Tensor, target_codes: torch.Tensor,
                     source: torch.Tensor, target: torch.Tensor, dilation: int = 1,
                     tol: float = 0.02) -> torch.Tensor:
    """Codes (B, h, w) of a source and its edited target + their pixels (B, 3, H, W) in
    [-1, 1] -> (B, h, w): the target's codes in the cells whose pixels change by more than
    ``tol`` (or within ``dilation`` cells of one), the source's codes everywhere else.

    Why: the VQ-GAN's codes depend on their surroundings (its encoder's receptive field and
    mid-block attention span the image), so encoding an edited image changes ~60 % of the
    codes of a ShapesWorld edit, most of them far from the edit, in ways no model can predict
    from the source; keeping the source's codes there makes unchanged cells a copy. One cell of
    dilation because a code also carries its neighbours' edges (docs/editing.md)."""
    h, w = target_codes.shape[-2:]
    if source.shape[-2] % h or source.shape[-1] % w:
        raise ValueError(f"a {h}x{w} code grid does not tile {tuple(source.shape[-2:])} pixels")
    changed = ((source - target).abs().amax(1, keepdim=True) > tol).float()
    changed = F.max_pool2d(changed, (source.shape[-2] // h, source.shape[-1] // w))
    if dilation:
        changed = F.max_pool2d(changed, 2 * dilation + 1, 1, dilation)
    return torch.where(changed[:, 0] > 0, target_codes, source_codes)


class Chameleon(nn.Module):
    """Token embedding over the unified vocabulary (+ optional 2-D image-cell embedding) +
    shared transformer + LM head. ``unused_text_ids``: text ids never generated
    (:meth:`unused_text_mask`)."""

    def __init__(self, cfg: ChameleonConfig, text_vocab: int, codebook_size: int,
                 codes_per_image: int, code_grid: tuple[int, int] | None = None,
                 unused_text_ids: Sequence[int] = ()):
        super().__init__()
        self.cfg = cfg
        self.text_vocab, self.codebook_size = text_vocab, codebook_size
        self.codes_per_image = codes_per_image
        side = round(codes_per_image ** 0.5)
        self.code_grid = tuple(code_grid) if code_grid is not None else (side, side)
        if self.code_grid[0] * self.code_grid[1] != codes_per_image:
            raise ValueError(f"code_grid {self.code_grid} does not hold {codes_per_image} codes; "
                             "pass code_grid for a non-square image")
        self.vocab_size = text_vocab + codebook_size
        unused = torch.zeros(self.vocab_size, dtype=torch.bool)
        unused[list(unused_text_ids)] = True
        if unused[text_vocab:].any():
            raise ValueError(f"unused_text_ids must be text ids, in [0, {text_vocab})")
        # not saved: it follows from the text tokenizer (fusion.data.text.chameleon_image_tokens)
        self.register_buffer("unused_text", unused, persistent=False)
        bb = transformer_config(cfg.backbone, **{"qk_norm": True, **cfg.backbone_overrides})
        self.embed = nn.Embedding(self.vocab_size, bb.d_model)
        self.transformer = Transformer(bb)
        self.lm_head = nn.Linear(bb.d_model, self.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.image_pos = (GridPositionEmbedding(self.code_grid, bb.d_model)
                          if cfg.image_pos_embed else None)
        self.source_proj = None
        if cfg.source_alignment:
            # zero at the start: a text->image model fine-tuned with it begins unchanged
            self.source_proj = nn.Linear(bb.d_model, bb.d_model, bias=False)
            nn.init.zeros_(self.source_proj.weight)
        self.copy_gate = None
        if cfg.source_copy:
            if not cfg.source_alignment:
                raise ValueError("source_copy copies the aligned source code: it needs "
                                 "source_alignment=true")
            # zero weight and bias: g = 0.5 everywhere at the start, so a fine-tune begins
            # with half of every target position's mass on the source's code
            self.copy_gate = nn.Linear(bb.d_model, 1)
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.zeros_(self.copy_gate.bias)
        self.digit_head = None
        if cfg.code_digit_levels:
            levels = list(cfg.code_digit_levels)
            if math.prod(levels) != codebook_size or min(levels) < 2:
                raise ValueError(f"code_digit_levels {levels} must be the FSQ levels of the "
                                 f"image tokenizer, whose product is its codebook size "
                                 f"{codebook_size}")
            # zero at the start: a model without it starts a fine-tune unchanged
            self.digit_head = nn.Linear(bb.d_model, sum(levels), bias=False)
            nn.init.zeros_(self.digit_head.weight)
            self.register_buffer("digit_map", code_digits(levels), persistent=False)  # (L, K)

    @property
    def max_seq_len(self) -> int:
        return self.transformer.cfg.max_seq_len

    def image_token_mask(self, device=None) -> torch.Tensor:
        """(V,) True for image-code ids."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        mask[self.text_vocab:] = True
        return mask

    def unused_text_mask(self, device=None) -> torch.Tensor:
        """(V,) True for text ids that are never generated: the in-vocabulary image tokens of
        a converted Meta Chameleon, whose rows moved to the code range
        (fusion.convert.chameleon). Meta's model suppresses them in text too."""
        return self.unused_text.to(device)

    def embed_tokens(self, ids: torch.Tensor, cells: torch.Tensor | None = None,
                     source: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, S) -> (B, S, D); with ``image_pos_embed``, + the embedding of each code's
        grid cell ``cells`` (B, S) (:func:`image_cells`; -1 = not a code), which is then
        required; with ``source_alignment``, + the projected embedding of the aligned source
        code ``source`` (B, S) (:func:`source_alignment`; -1 or None = none)."""
        x = self.embed(ids)
        if self.image_pos is not None:
            if cells is None:
                raise ValueError("this Chameleon model embeds image-code positions "
                                 "(image_pos_embed); pass the grid cell of every position "
                                 "(fusion.models.chameleon.image_cells)")
            x = x + self.image_pos(cells).to(x.dtype)
        if self.source_proj is not None and source is not None:
            aligned = self.source_proj(self.embed(source.clamp(min=0)))
            x = x + torch.where((source >= 0).unsqueeze(-1), aligned, 0).to(x.dtype)
        return x

    def head(self, hidden: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V). With ``source_copy``, positions whose aligned
        source code ``source`` (...) is >= 0 get normalised log-probabilities of the
        pointer-generator mixture g·onehot(source) + (1 - g)·softmax(logits) instead (fp32);
        cross-entropy and sampling treat both alike, since log_softmax leaves them unchanged."""
        logits = self.lm_head(hidden)
        if self.digit_head is not None:  # + each code's digit scores (module docstring)
            digits = self.digit_head(hidden) @ self.digit_map.to(logits.dtype)  # (..., K)
            logits = torch.cat([logits[..., :self.text_vocab],
                                logits[..., self.text_vocab:] + digits], -1)
        if self.copy_gate is None or source is None:
            return logits
        gate = self.copy_gate(hidden).float()  # (..., 1), the copy's logit
        mixed = logits.float().log_softmax(-1) + F.logsigmoid(-gate)
        index = source.clamp(min=0).unsqueeze(-1)
        copied = torch.logaddexp(mixed.gather(-1, index), F.logsigmoid(gate))
        mixed = mixed.scatter(-1, index, copied)
        return torch.where((source >= 0).unsqueeze(-1), mixed, logits.float())

    def forward(self, ids: torch.Tensor, layout: AttentionLayout, cache: KVCache | None = None,
                commit: bool = True, cells: torch.Tensor | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, S) (+ cells, source (B, S), see :meth:`embed_tokens`) -> logits (B, S, V)
        (see :meth:`head`)."""
        return self.head(self.transformer(self.embed_tokens(ids, cells, source), layout,
                                          cache=cache, commit=commit), source)

    def text_logits(self, ids: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """Logits (B, S, V) of a packed batch with no image positions (text-only documents)."""
        cells = torch.full_like(ids, -1) if self.image_pos is not None else None
        return self.forward(ids, layout, cells=cells)


class ChameleonLoss:
    """Documents -> id streams (+ CM3) -> packed -> next-token CE (+ z-loss)."""

    def __init__(self, cfg: ChameleonLossConfig, special: SpecialIds, cm3_tokens: CM3Tokens):
        if cfg.edit_loss not in EDIT_LOSSES:
            raise ValueError(f"unknown edit_loss {cfg.edit_loss!r}; expected one of "
                             f"{EDIT_LOSSES}")
        if cfg.edit_target_codes not in EDIT_TARGET_CODES:
            raise ValueError(f"unknown edit_target_codes {cfg.edit_target_codes!r}; expected "
                             f"one of {EDIT_TARGET_CODES}")
        self.cfg, self.special, self.cm3_tokens = cfg, special, cm3_tokens

    def text_budget(self, model: Chameleon, n_images: int) -> int:
        """The most text tokens a document with ``n_images`` images can hold in one packed
        row: the row minus ``<bos>``, ``<eos>`` and ``<boi> codes <eoi>`` per image. CM3 never
        pushes a document past the row (:meth:`documents_with_cells` keeps only the spans that
        fit), so it needs no room here."""
        row = row_length(self.cfg.pack_len, model.max_seq_len)
        return row - 2 - n_images * (model.codes_per_image + 2)

    def document_pieces(self, doc: Document, code_ids: list[list[int]], drop_caption: bool,
                        target_only: bool = False) -> list[list[int]]:
        """A document body as pieces: text ids, and ``<boi> codes <eoi>`` per image
        (``code_ids``: each image's ids in the unified vocabulary, or its placeholders).

        ``target_only``: every piece but the generated (non-condition) image is
        :class:`~fusion.models.packing.Context`, input that is never predicted."""
        s, out, images = self.special, [], iter(code_ids)
        for seg in doc.segments:
            if isinstance(seg, Text):
                if drop_caption:
                    continue
                piece = list(seg.ids)
            else:
                piece = [s.boi, *next(images), s.eoi]
            is_target = isinstance(seg, Image) and not seg.is_condition
            out.append(Context(piece) if target_only and not is_target else piece)
        return out

    def document_ids(self, doc: Document, codes: list[list[int]], text_vocab: int,
                     drop_caption: bool) -> list[int]:
        """A document as ids: <bos> ... <boi> codes+offset <eoi> ... <eos> (no CM3)."""
        code_ids = [[text_vocab + c for c in image] for image in codes]
        return [t for p in self.document_pieces(doc, code_ids, drop_caption) for t in p]

    def rows(self, model: Chameleon) -> RowSpec:
        return RowSpec(row_length(self.cfg.pack_len, model.max_seq_len), model.codes_per_image,
                       model.text_vocab, reads_source=model.source_proj is not None)

    def preparer(self, model: Chameleon) -> BatchPreparer:
        """:meth:`prepare` bound to ``model``'s sizes, for loader workers."""
        return BatchPreparer(self.prepare, self.rows(model))

    def _placeholder_documents(self, docs: list[Document], rng: random.Random, rows: RowSpec
                               ) -> tuple[list[list[list[int]]], list[Image], list[tuple]]:
        """(pieces per document, the batch's images in order, (source, target) image pairs
        that get local target codes): ``[<bos>], body..., [<eos>]``, the body CM3-transformed
        or not, with code placeholders (:func:`code_slots`) for the codes.

        CM3 runs on each document's body alone, so no span can cross a document boundary
        even after packing. Editing documents first get condition dropout (one draw each,
        before any other draw, so caption-only batches see the same random stream)."""
        cfg, s, n = self.cfg, self.special, rows.image_positions
        edits = [d.is_edit for d in docs]
        docs = [drop_edit_conditions(d, rng, cfg.edit_condition_dropout) if e else d
                for d, e in zip(docs, edits, strict=True)]
        images = [seg for d in docs for seg in d.segments if isinstance(seg, Image)]
        out, pairs, k = [], [], 0
        for doc, edit in zip(docs, edits, strict=True):
            n_img = len(doc.images)
            if cfg.edit_target_codes == "local" and doc.is_edit and n_img == 2:
                pairs.append((k, k + 1))  # source (condition), then target
            drop = caption_dropped(doc, rng, cfg.caption_dropout, edit)
            target_only = edit and cfg.edit_loss == "target"
            body = self.document_pieces(doc, [code_slots(k + i, n) for i in range(n_img)],
                                        drop, target_only)
            k += n_img
            if cfg.cm3 and not edit:
                flat = [t for p in body for t in p]
                spans = cm3_spans(len(flat), len(self.cm3_tokens.sentinels), rng,
                                  cfg.cm3_lambda, cfg.cm3_rate)
                # each span adds 3 positions (cm3_apply); keep the ones the row has room for
                spans = spans[:max(0, rows.row_length - 2 - len(flat)) // CM3_POSITIONS_PER_SPAN]
                body = [cm3_apply(flat, spans, self.cm3_tokens.sentinels, self.cm3_tokens.eoss)]
            eos = Context([s.eos]) if target_only else [s.eos]
            out.append([[s.bos], *body, eos])
        return out, images, pairs

    def prepare(self, docs: list[Document], rng: random.Random, rows: RowSpec) -> PreparedBatch:
        """The host half of the loss: dropout and CM3 draws (``rng``), packing with code
        placeholders, and the images stacked in order. ``extras``: ``local_pairs`` (see
        :meth:`_placeholder_documents`) and, for a model that reads it, ``source`` (B, S),
        the aligned source placeholder of each position (-1 = none)."""
        pieces, images, pairs = self._placeholder_documents(docs, rng, rows)
        packed = pack(pieces, rows.row_length, self.special.pad)
        extras: dict = {"local_pairs": pairs}
        if rows.reads_source:  # editing documents only; -1 everywhere else
            s = self.special
            extras["source"] = per_position(
                [source_alignment([t for p in doc for t in p], s.boi, s.eoi, rows.text_vocab)
                 if d.is_edit else [-1] * sum(len(p) for p in doc)
                 for doc, d in zip(pieces, docs, strict=True)], packed, fill=-1)
        return PreparedBatch(packed, ImageBatch.of(images), len(docs),
                             target_mask(pieces, packed), extras)

    def _code_ids(self, model: Chameleon, images: ImageBatch, pairs: list[tuple], encode
                  ) -> torch.Tensor | None:
        """(I·N,) the batch's codes in the unified vocabulary, image by image (None: none)."""
        if not images.count:
            return None
        device = model.embed.weight.device
        with torch.no_grad():
            grids = images.encode(encode, device)  # (I, h, w)
            if grids[0].numel() != model.codes_per_image:
                raise ValueError(f"the image tokenizer gives {tuple(grids.shape[1:])} codes per "
                                 f"image; the model takes {model.codes_per_image}")
            if pairs:
                src, tgt = (list(x) for x in zip(*pairs, strict=True))
                grids = grids.clone()
                grids[tgt] = local_edit_codes(grids[src], grids[tgt],
                                              images.pixels_of(src).to(device),
                                              images.pixels_of(tgt).to(device))
        return grids.flatten() + model.text_vocab

    def documents_with_cells(self, model: Chameleon, docs: list[Document], encode,
                             rng: random.Random) -> list[tuple[list[list[int]], list[int]]]:
        """(pieces, cells) per document, in this process: the packing pieces ``[<bos>],
        body..., [<eos>]`` (:meth:`_placeholder_documents`, codes filled in) and the
        image-grid cell of each of their tokens (-1 = not an image code)."""
        pieces, images, pairs = self._placeholder_documents(docs, rng, self.rows(model))
        code_ids = self._code_ids(model, ImageBatch.of(images), pairs, encode)
        out = []
        for doc in pieces:
            flat = torch.tensor([t for p in doc for t in p], dtype=torch.long)
            filled = fill_codes(flat, code_ids.cpu() if code_ids is not None else None).tolist()
            it = iter(filled)
            out.append(([type(p)(next(it) for _ in p) for p in doc],
                        slot_cells(flat, model.codes_per_image).tolist()))
        return out

    def documents(self, model: Chameleon, docs: list[Document], encode,
                  rng: random.Random) -> list[list[list[int]]]:
        """Packing pieces per document (:meth:`documents_with_cells` without the cells)."""
        return [pieces for pieces, _ in self.documents_with_cells(model, docs, encode, rng)]

    def sequences(self, model: Chameleon, docs: list[Document], encode,
                  rng: random.Random) -> list[list[int]]:
        """One id sequence per document: <bos> body (CM3-transformed or not) <eos>."""
        return [[t for p in doc for t in p] for doc in self.documents(model, docs, encode, rng)]

    def compute(self, model: Chameleon, batch: PreparedBatch, encode,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The device half: encode the images, fill in their codes, next-token CE (+ z-loss).
        ``encode``: pixels (I, 3, H, W) -> codes (I, h, w) int64, frozen (the VQ-GAN)."""
        device, packed = model.embed.weight.device, batch.packed
        code_ids = self._code_ids(model, batch.images, batch.extras["local_pairs"], encode)
        slots = packed.ids.to(device, non_blocking=True)
        ids = fill_codes(slots, code_ids)
        source = None
        if model.source_proj is not None:
            if "source" not in batch.extras:
                raise ValueError("the batch was prepared for a model without source alignment")
            source = fill_codes(batch.extras["source"].to(device, non_blocking=True), code_ids)
        logits = model(ids, packed.layout(device),
                       cells=(slot_cells(slots, model.codes_per_image)
                              if model.image_pos is not None else None),
                       source=source)
        filled = dataclasses.replace(packed, ids=ids)  # the targets are the real ids
        return next_token_loss(logits, filled, self.cfg.z_loss_weight, batch.predict)

    def __call__(self, model: Chameleon, docs: list[Document], encode, rng: random.Random,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """:meth:`prepare` then :meth:`compute`, in this process."""
        return self.compute(model, self.prepare(docs, rng, self.rows(model)), encode, generator)
