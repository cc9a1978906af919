"""The CM3 causal-masked objective (Aghajanyan et al. 2022, arXiv:2201.07520), as metaseq
implements it for CM3 and Chameleon.

A few spans of a document are cut out and moved to the end, so that a left-to-right model
also learns to infill with bidirectional context:

    <bos> a b c d e f g <eos>
 -> <bos> a <sentinel:0> e f g <sentinel:0> b c d <eoss> <eos>

* span placement is metaseq's (``CausalMaskedDocumentToSequenceDataset.get_spans_to_mask``,
  the code CM3 and Chameleon were trained with), see :func:`cm3_spans`: n ~ Poisson(λ)
  (λ = 1) capped at ``sentinels - 1``; one uniformly drawn interval for n = 1; for n >= 2,
  n² uniformly drawn candidate intervals, kept greedily while they do not overlap those
  already kept, so a document may get fewer than n spans;
* spans never touch <bos>/<eos>, and because the transform runs per document, no span
  crosses a document boundary;
* each span is replaced in place by ``<sentinel:i>`` and appended as
  ``<sentinel:i> span <eoss>`` in order;
* the loss is plain next-token cross-entropy on every non-pad target of the result.

``rate`` is the share of documents that get the transform (the rest stay as they are);
``rate = 0`` or ``λ = 0`` is the identity.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# What moving one span costs: a sentinel in its place, and a sentinel and <eoss> around it at
# the end (the span's own tokens only move).
CM3_POSITIONS_PER_SPAN = 3


@dataclass(frozen=True)
class CM3Tokens:
    sentinels: tuple[int, ...]  # <sentinel:0> ... <sentinel:k-1>
    eoss: int  # end of a moved span


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method; λ is small here."""
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _interval(rng: random.Random, length: int) -> tuple[int, int]:
    """One candidate span from two uniform draws u < v: [floor(u·L), round(v·L))."""
    u, v = sorted((rng.random(), rng.random()))
    return int(u * length), int(v * length + 0.5)


def cm3_spans(length: int, n_sentinels: int, rng: random.Random, poisson_lambda: float = 1.0,
              rate: float = 1.0) -> list[tuple[int, int]]:
    """The spans ``[start, end)`` that CM3 moves out of a body of ``length`` tokens, sorted:
    none for the share ``1 - rate`` of documents, else metaseq's placement.

    n ~ Poisson(λ), at most ``n_sentinels - 1`` (metaseq's cap). n = 1: one interval with
    uniform end points (start rounded down, end rounded to nearest), so its length is about
    L·|u - v|, a third of the document on average. n >= 2: n² such candidates, each kept
    unless it overlaps one kept before, until n are kept or the candidates run out; the
    count drops below n more often the larger n is. Empty candidates (start == end) are
    never kept: metaseq would write a sentinel over the token at ``start`` and lose it, which
    cannot be inverted. Over 20,000 bodies of 100 tokens (λ = 1, 8 sentinels) this gives
    0 / 1 / 2 / 3+ spans with shares 0.37 / 0.45 / 0.14 / 0.04 and a mean span length of 29.5
    tokens (tests/test_cm3.py pins both)."""
    if rate <= 0 or rng.random() >= rate or length < 1:
        return []
    n = min(_poisson(rng, poisson_lambda), max(0, n_sentinels - 1))
    if n == 0:
        return []
    kept: list[tuple[int, int]] = []
    for _ in range(n if n == 1 else n * n):
        start, end = _interval(rng, length)
        if start < end and all(end <= a or start >= b for a, b in kept):
            kept.append((start, end))
            if len(kept) == n:
                break
    return sorted(kept)


def cm3_apply(body: Sequence, spans: list[tuple[int, int]], sentinels: Sequence,
              eoss) -> list:
    """Move ``spans`` of ``body`` to the end: ``sentinels[i]`` in place of span i, then
    ``sentinels[i] span eoss`` blocks in order. Works on any per-token sequence, so a stream
    that runs alongside the ids (Chameleon's image-cell indices) is moved the same way."""
    out, tail, prev = [], [], 0
    for i, (start, end) in enumerate(spans):
        out += list(body[prev:start]) + [sentinels[i]]
        tail += [sentinels[i], *body[start:end], eoss]
        prev = end
    return out + list(body[prev:]) + tail


def cm3_transform(body: Sequence[int], tokens: CM3Tokens, rng: random.Random,
                  poisson_lambda: float = 1.0, rate: float = 1.0) -> list[int]:
    """Mask spans of a document body (the tokens between <bos> and <eos>).

    Returns the new body: the body with sentinels in place of the spans, followed by the
    ``<sentinel:i> span <eoss>`` blocks: 3 positions longer per span
    (:data:`CM3_POSITIONS_PER_SPAN`).
    """
    spans = cm3_spans(len(body), len(tokens.sentinels), rng, poisson_lambda, rate)
    return cm3_apply(body, spans, tokens.sentinels, tokens.eoss)


def cm3_invert(transformed: Sequence[int], tokens: CM3Tokens) -> list[int]:
    """Rebuild the original body from :func:`cm3_transform`'s output."""
    seq = list(transformed)
    sentinel_ids = set(tokens.sentinels)
    # The tail starts at the second occurrence of the first sentinel used.
    first = next((i for i, t in enumerate(seq) if t in sentinel_ids), None)
    if first is None:
        return seq
    tail_start = seq.index(seq[first], first + 1)
    head, tail = seq[:tail_start], seq[tail_start:]
    spans: dict[int, list[int]] = {}
    i = 0
    while i < len(tail):
        sentinel = tail[i]
        end = tail.index(tokens.eoss, i + 1)
        spans[sentinel] = tail[i + 1:end]
        i = end + 1
    out: list[int] = []
    for t in head:
        out += spans[t] if t in sentinel_ids else [t]
    return out
