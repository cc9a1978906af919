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

Shape legend: B = rows, S = positions, D = d_model, V = text_vocab + codebook,
h/w = code grid.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from fusion.data.documents import Document, Image, Text, drop_edit_conditions
from fusion.models.attention import AttentionLayout
from fusion.models.cm3 import CM3Tokens, cm3_transform
from fusion.models.packing import Context, next_token_loss, pack, row_length, target_mask
from fusion.models.schemas import EDIT_LOSSES, ChameleonConfig, ChameleonLossConfig
from fusion.models.transformer import KVCache, Transformer, transformer_config
from fusion.models.transfusion import SpecialIds


class Chameleon(nn.Module):
    """Token embedding over the unified vocabulary + shared transformer + LM head."""

    def __init__(self, cfg: ChameleonConfig, text_vocab: int, codebook_size: int,
                 codes_per_image: int):
        super().__init__()
        self.cfg = cfg
        self.text_vocab, self.codebook_size = text_vocab, codebook_size
        self.codes_per_image = codes_per_image
        self.vocab_size = text_vocab + codebook_size
        bb = transformer_config(cfg.backbone, **{"qk_norm": True, **cfg.backbone_overrides})
        self.embed = nn.Embedding(self.vocab_size, bb.d_model)
        self.transformer = Transformer(bb)
        self.lm_head = nn.Linear(bb.d_model, self.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def max_seq_len(self) -> int:
        return self.transformer.cfg.max_seq_len

    def image_token_mask(self, device=None) -> torch.Tensor:
        """(V,) True for image-code ids."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        mask[self.text_vocab:] = True
        return mask

    def forward(self, ids: torch.Tensor, layout: AttentionLayout, cache: KVCache | None = None,
                commit: bool = True) -> torch.Tensor:
        """ids (B, S) -> logits (B, S, V)."""
        return self.lm_head(self.transformer(self.embed(ids), layout, cache=cache,
                                             commit=commit))


class ChameleonLoss:
    """Documents -> id streams (+ CM3) -> packed -> next-token CE (+ z-loss)."""

    def __init__(self, cfg: ChameleonLossConfig, special: SpecialIds, cm3_tokens: CM3Tokens):
        if cfg.edit_loss not in EDIT_LOSSES:
            raise ValueError(f"unknown edit_loss {cfg.edit_loss!r}; expected one of "
                             f"{EDIT_LOSSES}")
        self.cfg, self.special, self.cm3_tokens = cfg, special, cm3_tokens

    def document_pieces(self, doc: Document, codes: list[list[int]], text_vocab: int,
                        drop_caption: bool, target_only: bool = False) -> list[list[int]]:
        """A document body as pieces: text ids, and ``<boi> codes+offset <eoi>`` per image.

        ``target_only``: every piece but the generated (non-condition) image is
        :class:`~fusion.models.packing.Context`, input that is never predicted."""
        s, out, images = self.special, [], iter(codes)
        for seg in doc.segments:
            if isinstance(seg, Text):
                if drop_caption:
                    continue
                piece = list(seg.ids)
            else:
                piece = [s.boi] + [text_vocab + c for c in next(images)] + [s.eoi]
            is_target = isinstance(seg, Image) and not seg.is_condition
            out.append(Context(piece) if target_only and not is_target else piece)
        return out

    def document_ids(self, doc: Document, codes: list[list[int]], text_vocab: int,
                     drop_caption: bool) -> list[int]:
        """A document as ids: <bos> ... <boi> codes+offset <eoi> ... <eos> (no CM3)."""
        return [t for p in self.document_pieces(doc, codes, text_vocab, drop_caption) for t in p]

    def documents(self, model: Chameleon, docs: list[Document], encode,
                  rng: random.Random) -> list[list[list[int]]]:
        """Packing pieces per document: ``[<bos>], body..., [<eos>]``, the body
        CM3-transformed or not.

        CM3 runs on each document's body alone, so no span can cross a document boundary
        even after packing. Editing documents first get condition dropout (one draw each, before
        any other draw, so caption-only batches see the same random stream as before)."""
        cfg, device = self.cfg, model.embed.weight.device
        edits = [d.is_edit for d in docs]
        docs = [drop_edit_conditions(d, rng, cfg.edit_condition_dropout) if e else d
                for d, e in zip(docs, edits, strict=True)]
        pixels = [seg.pixels for d in docs for seg in d.segments if isinstance(seg, Image)]
        codes = []
        if pixels:
            with torch.no_grad():
                codes = encode(torch.stack(pixels).to(device)).flatten(1).tolist()
        out, k = [], 0
        for doc, edit in zip(docs, edits, strict=True):
            n_img = len(doc.images)
            drop = (not edit and doc.order == "caption_first"
                    and rng.random() < cfg.caption_dropout)
            target_only = edit and cfg.edit_loss == "target"
            body = self.document_pieces(doc, codes[k:k + n_img], model.text_vocab, drop,
                                        target_only)
            k += n_img
            if cfg.cm3 and not edit:
                flat = [t for p in body for t in p]
                body = [cm3_transform(flat, self.cm3_tokens, rng, cfg.cm3_lambda, cfg.cm3_rate)]
            eos = Context([self.special.eos]) if target_only else [self.special.eos]
            out.append([[self.special.bos], *body, eos])
        return out

    def sequences(self, model: Chameleon, docs: list[Document], encode,
                  rng: random.Random) -> list[list[int]]:
        """One id sequence per document: <bos> body (CM3-transformed or not) <eos>."""
        return [[t for p in doc for t in p] for doc in self.documents(model, docs, encode, rng)]

    def __call__(self, model: Chameleon, docs: list[Document], encode, rng: random.Random,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``encode``: pixels (I, 3, H, W) -> codes (I, h, w) int64, frozen (the VQ-GAN)."""
        cfg, device = self.cfg, model.embed.weight.device
        pieces = self.documents(model, docs, encode, rng)
        packed = pack(pieces, row_length(cfg.pack_len, model.max_seq_len), self.special.pad)
        ids = packed.ids.to(device)
        logits = model(ids, AttentionLayout(packed.doc_ids.to(device),
                                            packed.image_ids.to(device)))
        return next_token_loss(logits, packed, cfg.z_loss_weight, target_mask(pieces, packed))
