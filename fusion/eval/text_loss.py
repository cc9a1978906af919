"""Held-out text loss: next-token cross-entropy of a family model on caption-only documents.

The Transfusion paper compares the families' text modelling at equal compute by perplexity
on text-only data (arXiv:2408.11039, Sec. 4.2). Here the text is the captions of ShapesWorld
scenes that training never sees (``heldout_start`` on), each a document of its own, scored by
the family's own training loss (the same packing, special tokens and targets) with nothing
that is random at training time: no caption dropout applies to a document without an image,
and Chameleon's CM3 rearrangement, which would move spans of the text itself, is turned off.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import torch

from fusion.data.documents import Document, Text
from fusion.data.sources import ShapesSource
from fusion.errors import UserError

HELDOUT_TEXT_START = 1_500_000  # past the caption-scoring scenes of fusion.eval.model


def _next_token_only(loss):
    """The family's loss with training-time rearrangements of text turned off (CM3)."""
    cfg = getattr(loss, "cfg", None)
    if dataclasses.is_dataclass(cfg) and getattr(cfg, "cm3", False):
        loss = copy.copy(loss)
        loss.cfg = dataclasses.replace(cfg, cm3=False)
    return loss


def caption_documents(tokenizer, n: int, world_seed: int = 0,
                      start: int = HELDOUT_TEXT_START) -> list[Document]:
    """``n`` caption-only documents: scene ``start + i``'s caption, as training draws it."""
    source = ShapesSource(n, seed=world_seed, offset=start)
    captions = [source.text_of(i)[1][0] for i in range(n)]
    return [Document((Text(tuple(ids), text),))
            for ids, text in zip(tokenizer.encode_batch(captions), captions, strict=True)]


@torch.no_grad()
def heldout_text_loss(model, loss, tokenizer, n_documents: int = 256, world_seed: int = 0,
                      start: int = HELDOUT_TEXT_START, batch_size: int = 64) -> dict:
    """``{"text_loss": nats per predicted token, "text_perplexity", "text_loss_documents",
    "text_loss_tokens"}`` over ``n_documents`` held-out caption-only documents."""
    if n_documents < 1:
        raise UserError(f"the text loss needs at least one document, got {n_documents}")
    loss = _next_token_only(loss)
    docs = caption_documents(tokenizer, n_documents, world_seed, start)

    def no_images(_pixels):  # caption-only documents have none
        raise AssertionError("a caption-only document asked for an image encoding")

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for i in range(0, len(docs), batch_size):
            batch = docs[i:i + batch_size]
            out = loss(model, batch, no_images, random.Random(0))
            # <bos> text <eos>: every position but a document's last predicts the next token
            targets = int(out["positions"]) - len(batch)
            total += float(out["lm_loss"]) * targets
            tokens += targets
    finally:
        model.train(was_training)
    mean = total / tokens
    return {"text_loss": mean, "text_perplexity": math.exp(mean),
            "text_loss_documents": len(docs), "text_loss_tokens": tokens}
