"""Mixed-modal attention masks: the rule, both backends, layouts and their errors."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.models.attention import (
    AttentionLayout,
    attend,
    call_backend,
    document_positions,
    layout_from_segments,
    reference_mask,
    resolve_backend,
    sdpa_kernels,
)

# Eager FlexAttention on CPU warns that it is unfused; that is what these tests want.
ignore_eager_flex_warning = pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile"
)


@st.composite
def raw_ids(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary (B, S) doc and image ids, not even contiguous: the rule must hold anyway."""
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    ids = st.lists(st.integers(-1, 2), min_size=batch * seq, max_size=batch * seq)
    doc = torch.tensor(draw(ids)).view(batch, seq)
    img = torch.tensor(draw(ids)).view(batch, seq)
    return doc, img


@st.composite
def segment_rows(draw: st.DrawFn) -> tuple[list[list[tuple[int, str, int]]], int]:
    """Rows of packed documents made of text runs and images, right-padded."""
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        row = []
        for doc in range(draw(st.integers(1, 3))):
            for _ in range(draw(st.integers(1, 3))):
                row.append((doc, draw(st.sampled_from(["text", "image"])), draw(st.integers(1, 6))))
        rows.append(row)
    longest = max(sum(n for *_, n in row) for row in rows)
    return rows, longest + draw(st.integers(0, 3))


def random_qkv(batch: int, seq: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
    return (
        torch.randn(batch, heads, seq, head_dim),
        torch.randn(batch, kv_heads, seq, head_dim),
        torch.randn(batch, kv_heads, seq, head_dim),
    )


@settings(max_examples=50, deadline=None)
@given(raw_ids())
def test_dense_mask_matches_loop_reference(ids):
    doc, img = ids
    assert torch.equal(AttentionLayout(doc, img).dense_mask[:, 0], reference_mask(doc, img))


@settings(max_examples=30, deadline=None)
@given(raw_ids(), st.data())
def test_prefix_mask_is_the_bottom_rows_of_the_full_mask(ids, data):
    doc, img = ids
    split = data.draw(st.integers(0, doc.shape[1] - 1))
    layout = AttentionLayout(doc[:, split:], img[:, split:]).with_prefix(
        doc[:, :split], img[:, :split]
    )
    assert torch.equal(layout.dense_mask[:, 0], reference_mask(doc, img)[:, split:])


@ignore_eager_flex_warning
@settings(max_examples=25, deadline=None)
@given(segment_rows(), st.sampled_from([3, 8, 256]))
def test_sdpa_and_flex_agree(rows_and_len, query_tile):
    rows, seq_len = rows_and_len
    layout = replace(layout_from_segments(rows, seq_len), query_tile=query_tile)
    q, k, v = random_qkv(len(rows), seq_len)
    sdpa = attend(q, k, v, layout, "sdpa")
    flex = attend(q, k, v, layout, "flex")
    assert torch.isfinite(sdpa).all(), "padding queries must not produce NaN"
    real = (layout.doc_ids >= 0)[:, None, :, None].expand_as(sdpa)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)


@ignore_eager_flex_warning
@settings(max_examples=25, deadline=None)
@given(segment_rows(), st.sampled_from([3, 256]), st.data())
def test_sdpa_and_flex_agree_behind_a_prefix(rows_and_len, query_tile, data):
    rows, seq_len = rows_and_len
    full = layout_from_segments(rows, seq_len)
    split = data.draw(st.integers(0, seq_len - 1))
    layout = AttentionLayout(
        full.doc_ids[:, split:], full.image_ids[:, split:], query_tile=query_tile
    ).with_prefix(full.doc_ids[:, :split], full.image_ids[:, :split])
    q, k, v = random_qkv(len(rows), seq_len)
    q = q[:, :, split:]
    torch.testing.assert_close(
        attend(q, k, v, layout, "flex"), attend(q, k, v, layout, "sdpa"), atol=1e-5, rtol=1e-5
    )


def test_sdpa_tiles_skip_invisible_keys():
    # Two documents of 8: the second tile of document 1 needs neither document 0 nor the future.
    layout = layout_from_segments([[(0, "text", 8), (1, "text", 2), (1, "image", 6)]])
    tiles = replace(layout, query_tile=4).sdpa_tiles
    assert tiles == [(slice(0, 4), slice(0, 4)), (slice(4, 8), slice(0, 8)),
                     (slice(8, 12), slice(8, 16)), (slice(12, 16), slice(8, 16))]  # fmt: skip


def test_padding_sees_only_itself_and_is_never_seen():
    layout = layout_from_segments([[(0, "text", 3), (0, "image", 2)]], seq_len=7)
    mask = layout.dense_mask[0, 0]
    assert torch.equal(mask[5:, :], torch.eye(7, dtype=torch.bool)[5:])
    assert not mask[:5, 5:].any()


def test_plain_causal_detection_and_fast_path():
    text_only = layout_from_segments([[(0, "text", 6)], [(3, "text", 6)]])
    assert text_only.is_plain_causal
    for rows in (
        [[(0, "text", 3), (0, "image", 3)]],  # image
        [[(0, "text", 3), (1, "text", 3)]],  # two documents
        [[(0, "text", 6)], [(0, "text", 4)]],  # padding
    ):
        assert not layout_from_segments(rows).is_plain_causal
    q, k, v = random_qkv(2, 6)
    masked = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=text_only.dense_mask, enable_gqa=True
    )
    torch.testing.assert_close(attend(q, k, v, text_only, "sdpa"), masked)


def test_layout_from_segments_ids_and_positions():
    layout = layout_from_segments(
        [[(0, "text", 2), (0, "image", 3), (0, "image", 2), (1, "text", 2)], [(4, "text", 3)]]
    )
    assert layout.doc_ids.tolist() == [[0] * 7 + [1] * 2, [4] * 3 + [-1] * 6]
    assert layout.image_ids.tolist() == [[-1, -1, 0, 0, 0, 1, 1, -1, -1], [-1] * 9]
    # RoPE positions restart at each document start.
    assert layout.rope_positions.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 0, 1],
        [0, 1, 2, 0, 1, 2, 3, 4, 5],
    ]


def test_default_positions_continue_the_prefix():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    layout = AttentionLayout(doc[:, 4:], torch.full((1, 2), -1)).with_prefix(
        doc[:, :4], torch.full((1, 4), -1)
    )
    assert layout.rope_positions.tolist() == [[1, 2]]
    assert torch.equal(document_positions(doc), torch.tensor([[0, 1, 2, 0, 1, 2]]))


def test_bad_layouts_raise():
    doc = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="image_ids shape"):
        AttentionLayout(doc, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positions shape"):
        AttentionLayout(doc, doc, positions=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        AttentionLayout(doc.float(), doc)
    with pytest.raises(ValueError, match="does not fit"):
        layout_from_segments([[(0, "text", 5)]], seq_len=4)
    with pytest.raises(ValueError, match="bad segment"):
        layout_from_segments([[(0, "audio", 5)]])
    q, k, v = random_qkv(2, 6)
    with pytest.raises(ValueError, match="layout is for B=2, S=5"):
        attend(q, k, v, AttentionLayout(doc, doc))
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("xformers", torch.device("cpu"))


def test_backend_resolution_respects_the_compiled_flex_head_dim_floor():
    """'auto' picks flex only on CUDA with heads >= 16 wide: Inductor's flex kernel refuses
    narrower ones (seen on an H200, torch 2.11). An explicit 'flex' there fails with advice."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # constructing needs no GPU
    assert resolve_backend("auto", cuda, head_dim=64) == "flex"
    assert resolve_backend("auto", cuda) == "flex"
    assert resolve_backend("auto", cuda, head_dim=8) == "sdpa"
    assert resolve_backend("auto", cpu, head_dim=64) == "sdpa"
    assert resolve_backend("flex", cpu, head_dim=8) == "flex"  # eager reference path
    with pytest.raises(ValueError, match="head_dim >= 16.*got 8"):
        resolve_backend("flex", cuda, head_dim=8)


def test_cached_calls_run_auto_on_sdpa(monkeypatch):
    """Under a KV cache (prefill, decoding, denoising steps) 'auto' means SDPA on every device,
    since compiled flex failed to lower a cached Chameleon prefill on an H200; uncached passes
    keep 'auto' (flex on CUDA) and an explicit backend is never overridden."""
    assert call_backend("auto", cached=True) == "sdpa"
    assert call_backend("auto", cached=False) == "auto"
    assert call_backend("flex", cached=True) == "flex"
    assert call_backend("sdpa", cached=True) == "sdpa"

    import fusion.models.transformer as transformer

    seen = []

    def recording_attend(q, k, v, layout, backend="auto"):
        seen.append(backend)
        return attend(q, k, v, layout, "sdpa")

    monkeypatch.setattr(transformer, "attend", recording_attend)
    model = transformer.Transformer(transformer.TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16)).eval()
    layout = layout_from_segments([[(0, "text", 3), (0, "image", 4)]])
    with torch.no_grad():
        model(torch.randn(1, 7, 32), layout)
        assert seen == ["auto", "auto"]
        seen.clear()
        model(torch.randn(1, 7, 32), layout, cache=model.new_cache())
    assert seen == ["sdpa", "sdpa"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_matches_sdpa_on_cuda():
    layout = layout_from_segments(
        [
            [(0, "text", 100), (0, "image", 256), (0, "text", 60), (1, "text", 96)],
            [(0, "text", 300)],
        ],
        device="cuda",
    )
    q, k, v = (t.cuda().requires_grad_() for t in random_qkv(2, 512, head_dim=64))
    flex = attend(q, k, v, layout, "flex")
    grads_flex = torch.autograd.grad(flex.sum(), (q, k, v))
    sdpa = attend(q, k, v, layout, "sdpa")
    grads_sdpa = torch.autograd.grad(sdpa.sum(), (q, k, v))
    torch.testing.assert_close(flex, sdpa, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads_flex, grads_sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_auto_takes_the_math_kernel_only_for_short_bf16_cpu_training():
    def kernel(dtype=torch.bfloat16, grad=True, key_len=64, backend="auto"):
        q = torch.zeros(1, 1, 1, 8, dtype=dtype, requires_grad=grad)
        return type(sdpa_kernels(q, key_len, backend)).__name__

    restricted, free = kernel(), kernel(backend="sdpa")
    assert restricted != free  # a kernel restriction against torch's own choice
    assert kernel(key_len=128) == restricted
    for case in (dict(dtype=torch.float32), dict(dtype=torch.float16), dict(grad=False),
                 dict(key_len=129)):
        assert kernel(**case) == free, case


def test_auto_and_sdpa_agree_in_bf16_training():
    # The math kernel that `auto` picks for short bf16 CPU rows computes the same attention
    # and gradients as torch's default choice (bf16 rounding apart).
    layout = layout_from_segments([[(0, "text", 5), (0, "image", 6), (1, "text", 9)],
                                   [(2, "image", 4), (2, "text", 12)]])
    results = []
    for backend in ("auto", "sdpa"):
        torch.manual_seed(0)
        q, k, v = (t.bfloat16().requires_grad_() for t in random_qkv(2, 20, head_dim=16))
        out = attend(q, k, v, layout, backend)
        out.float().square().sum().backward()
        results.append((out.float(), q.grad.float(), k.grad.float(), v.grad.float()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_flex_probe_refuses_to_run_without_cuda():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "scripts/probe_flex.py", "--seq", "73"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "needs CUDA" in run.stderr
