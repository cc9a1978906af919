"""CM3: invertible, document-local, λ=0 identity, span statistics."""

import collections
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.models.cm3 import CM3Tokens, cm3_invert, cm3_spans, cm3_transform

TOKENS = CM3Tokens(sentinels=tuple(range(6, 14)), eoss=5)


@settings(max_examples=200, deadline=None)
@given(body=st.lists(st.integers(20, 99), min_size=0, max_size=60),
       seed=st.integers(0, 10**6), lam=st.floats(0, 4))
def test_transform_is_invertible(body, seed, lam):
    out = cm3_transform(body, TOKENS, random.Random(seed), poisson_lambda=lam)
    assert cm3_invert(out, TOKENS) == body
    n_spans = sum(t in TOKENS.sentinels for t in out) // 2
    assert len(out) == len(body) + 3 * n_spans  # one sentinel in place, sentinel+eoss at end
    assert out.count(TOKENS.eoss) == n_spans <= len(TOKENS.sentinels)


def test_lambda_zero_and_rate_zero_are_identity():
    body = list(range(20, 60))
    for seed in range(50):
        assert cm3_transform(body, TOKENS, random.Random(seed), poisson_lambda=0) == body
        assert cm3_transform(body, TOKENS, random.Random(seed), rate=0) == body


def test_span_count_is_poisson_and_sentinels_are_in_order():
    body = list(range(20, 120))
    counts = []
    for seed in range(2000):
        out = cm3_transform(body, TOKENS, random.Random(seed), poisson_lambda=1.0)
        used = [t for t in out if t in TOKENS.sentinels]
        n = len(used) // 2
        counts.append(n)
        assert used[:n] == list(TOKENS.sentinels[:n])  # in place, in order
        assert used[n:] == list(TOKENS.sentinels[:n])  # then appended in the same order
    mean = sum(counts) / len(counts)
    # n ~ Poisson(1), but for n >= 2 the greedy placement keeps fewer when candidates overlap
    assert 0.80 < mean < 0.92
    assert 0.32 < counts.count(0) / len(counts) < 0.42  # P(0) = e^-1 = 0.368


def _span_stats(n_docs, length, n_sentinels, lam, seed=0):
    rng = random.Random(seed)
    counts, lengths, starts = collections.Counter(), [], []
    for _ in range(n_docs):
        spans = cm3_spans(length, n_sentinels, rng, lam)
        counts[len(spans)] += 1
        lengths += [b - a for a, b in spans]
        starts += [a for a, _ in spans]
        assert spans == sorted(spans) and all(0 <= a < b <= length for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))
    return counts, lengths, starts


def test_one_span_is_a_uniform_interval():
    """n = 1 (forced: a large λ capped at sentinels - 1 = 1): the span is [floor(uL),
    round(vL)) for the smaller and larger of two uniforms, so start and length both have
    mean L/3, and the span is empty (dropped) only when both round to the same token."""
    counts, lengths, starts = _span_stats(20000, 90, 2, lam=30.0)
    assert set(counts) <= {0, 1} and counts[0] < 0.01 * 20000
    assert abs(sum(lengths) / len(lengths) - (90 / 3 + 0.5)) < 0.6
    assert abs(sum(starts) / len(starts) - (90 / 3 - 0.5)) < 0.6


def test_span_counts_and_lengths_follow_metaseqs_placement():
    """λ = 1, 8 sentinels, bodies of 100 tokens: Poisson counts capped at 7, n >= 2 placed
    greedily from n² candidates. Shares of 0 / 1 / 2 / 3+ spans 0.37 / 0.45 / 0.14 / 0.04 and
    a mean span length of 29.5 (the old rule, 2n sorted cut points: 0.38 / 0.37 / 0.18 / 0.08
    and 23.6)."""
    counts, lengths, _ = _span_stats(20000, 100, 8, lam=1.0)
    share = {k: counts[k] / 20000 for k in range(3)}
    share[3] = 1 - sum(share.values())
    for k, expected in {0: 0.368, 1: 0.452, 2: 0.141, 3: 0.039}.items():
        assert abs(share[k] - expected) < 0.012, (k, share[k])
    assert abs(sum(lengths) / len(lengths) - 29.5) < 0.8
    # the cap is sentinels - 1, whatever λ asks for
    counts, _, _ = _span_stats(2000, 100, 4, lam=20.0)
    assert max(counts) == 3


def test_spans_never_cross_documents_after_packing():
    """Each packed document, read back by its document id, inverts to that document alone."""
    import torch

    from fusion.data.documents import Document, Text
    from fusion.models.chameleon import Chameleon, ChameleonLoss
    from fusion.models.packing import SpecialIds, pack
    from fusion.models.schemas import ChameleonConfig, ChameleonLossConfig

    special = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
    model = Chameleon(ChameleonConfig(backbone_overrides=dict(
        d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=128, multiple_of=16)),
        text_vocab=100, codebook_size=16, codes_per_image=4)
    loss = ChameleonLoss(ChameleonLossConfig(cm3_rate=1.0, cm3_lambda=2.0), special, TOKENS)
    docs = [Document((Text(tuple(range(20 + 10 * i, 28 + 10 * i))),)) for i in range(4)]
    for seed in range(100):
        seqs = loss.sequences(model, docs, None, random.Random(seed))
        packed = pack([[s] for s in seqs], 128, special.pad)
        for d, doc in enumerate(docs):
            row = (packed.doc_ids == d).nonzero()
            ids = packed.ids[row[:, 0], row[:, 1]].tolist()
            assert ids[0] == special.bos and ids[-1] == special.eos
            assert cm3_invert(ids[1:-1], TOKENS) == list(doc.texts[0].ids)
        assert torch.equal(packed.doc_ids[0, :len(seqs[0])], torch.zeros(len(seqs[0]),
                                                                         dtype=torch.long))
