"""Held-out text loss: how well a family model predicts caption text it never trained on.

The Transfusion paper compares the families' text modelling at equal compute by perplexity
on text-only data (arXiv:2408.11039, Sec. 4.2). Here the text is the captions of ShapesWorld
scenes that training never sees (``heldout_start`` on). Each caption is scored as it opens a
caption-first training document: ``<bos> caption``, every caption token predicted from
``<bos>`` and the tokens before it (next-token cross-entropy, nats per token). What follows the
caption is not scored: in training it is an image (``<boi>``) or, in image-first documents,
``<eos>`` after an image, so ``<eos>`` straight after a caption is a sequence no training
document holds, and its loss (10-13 nats on the tiny recipes) grows with training and would
swamp the caption's. Chameleon's softmax runs over its whole vocabulary, image codes included.

Shapes: ids (B, S) packed rows; logits (B, S, V); targets (B, S) with -100 where nothing is
predicted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusion.data.sources import ShapesSource
from fusion.errors import UserError
from fusion.models.attention import AttentionLayout
from fusion.models.packing import pack

HELDOUT_TEXT_START = 1_500_000  # past the caption-scoring scenes of fusion.eval.model


def heldout_captions(n: int, world_seed: int = 0, start: int = HELDOUT_TEXT_START) -> list[str]:
    """The captions of scenes ``start .. start + n - 1``, drawn as training draws them."""
    source = ShapesSource(n, seed=world_seed, offset=start)
    return [source.text_of(i)[1][0] for i in range(n)]


@torch.no_grad()
def heldout_text_loss(model, tokenizer, n_documents: int = 256, world_seed: int = 0,
                      start: int = HELDOUT_TEXT_START, batch_size: int = 64) -> dict:
    """``{"text_loss": nats per caption token, "text_perplexity", "text_loss_documents",
    "text_loss_tokens"}`` over ``n_documents`` held-out captions. ``model``: a family model
    with ``text_logits(ids, layout)`` (fusion.families.registry)."""
    from fusion.models.packing import SpecialIds

    if n_documents < 1:
        raise UserError(f"the text loss needs at least one document, got {n_documents}")
    if not callable(getattr(model, "text_logits", None)):
        raise UserError(f"{type(model).__name__} has no text_logits(ids, layout): its family "
                        "does not support the held-out text loss")
    special = SpecialIds.from_tokenizer(tokenizer)
    documents = [[[special.bos, *ids]] for ids in
                 tokenizer.encode_batch(heldout_captions(n_documents, world_seed, start))]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for i in range(0, len(documents), batch_size):
            batch = documents[i:i + batch_size]
            packed = pack(batch, max(len(d[0]) for d in batch), special.pad)
            logits = model.text_logits(packed.ids.to(device), AttentionLayout(
                packed.doc_ids.to(device), packed.image_ids.to(device)))
            targets = packed.next_token_targets().to(device)  # the caption tokens
            total += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                           ignore_index=-100, reduction="sum"))
            tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    mean = total / tokens
    return {"text_loss": mean, "text_perplexity": math.exp(mean),
            "text_loss_documents": len(documents), "text_loss_tokens": tokens}
