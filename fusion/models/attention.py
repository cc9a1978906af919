"""Mixed-modal attention: a per-position modality map becomes a mask for SDPA or FlexAttention.

Dimension legend
    B    batch size
    S    positions in this call (the queries)
    P    cached prefix length (KV cache); 0 without a cache
    K    key length = P + S: the cached prefix followed by the S new positions
    H    query heads
    Hkv  key/value heads (grouped-query attention, H % Hkv == 0)
    Dh   head dimension

The rule (Transfusion, arXiv:2408.11039, "Transfusion attention"): every position carries a
document id (-1 = padding) and an image id (-1 = not in an image). Query q sees key k when

    doc[q] == doc[k] >= 0  and  (k <= q  or  img[q] == img[k] >= 0)

i.e. causal attention inside a document, bidirectional inside an image, nothing across
documents (packing several documents into one row only adds document ids).

Padding queries attend to themselves only: their row would otherwise be empty and softmax over
no keys gives NaN (SDPA) or an arbitrary zero (FlexAttention). Seeing only itself keeps every
backend finite and identical, and padding keys are never seen by a real query, so padding
cannot influence real positions. Losses must still ignore padding outputs.

Indices in the rule are positions in the key sequence, so with a cache the S queries sit at
key indices P .. P+S-1. RoPE positions are separate (see `AttentionLayout.rope_positions`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Backend = Literal["auto", "sdpa", "flex"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex")
PAD_DOC = -1  # doc id of padding positions
NO_IMAGE = -1  # image id of non-image positions

Segment = tuple[int, str, int]  # (doc id, "text" | "image", length)


def _visible(
    q_doc: Tensor, q_img: Tensor, q_idx: Tensor, k_doc: Tensor, k_img: Tensor, k_idx: Tensor
) -> Tensor:
    """The mask rule on broadcastable tensors (True = query may attend to key).

    Shared by the dense SDPA mask and the FlexAttention ``mask_mod`` so the two backends
    cannot drift apart; `reference_mask` is the independent check.
    """
    same_doc = (q_doc == k_doc) & (q_doc >= 0)
    same_image = (q_img == k_img) & (q_img >= 0)
    return (same_doc & ((k_idx <= q_idx) | same_image)) | (k_idx == q_idx)


def document_positions(doc_ids: Tensor) -> Tensor:
    """Index of each position within its contiguous run of the same document id.

    (B, S) -> (B, S). The count restarts wherever the doc id changes, so packed documents
    each start at RoPE position 0, exactly as if they had been run alone.
    """
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run_start = torch.where(starts, idx, 0).cummax(dim=1).values
    return idx - run_start


# Inductor's FlexAttention kernel refuses head dims below 16 ("NYI: embedding dimension of the
# query, key, and value must be at least 16"; seen with torch 2.11 on an H200).
FLEX_MIN_HEAD_DIM = 16


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """'auto' -> 'flex' on CUDA (compiled, block-sparse), 'sdpa' elsewhere or when the heads are
    too narrow for the compiled kernel (``head_dim`` < FLEX_MIN_HEAD_DIM).

    FlexAttention has no backward pass on CPU (torch 2.13), so CPU training must use SDPA. An
    explicit 'flex' with narrow heads on CUDA is refused here rather than deep inside Inductor.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    narrow = head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM
    if backend == "auto":
        return "flex" if device.type == "cuda" and not narrow else "sdpa"
    if backend == "flex" and device.type == "cuda" and narrow:
        raise ValueError(
            f"attn_backend='flex' needs head_dim >= {FLEX_MIN_HEAD_DIM} for the compiled CUDA "
            f"kernel, got {head_dim} (d_model / n_heads); use 'auto' or 'sdpa', or fewer heads"
        )
    return backend


def call_backend(backend: str, cached: bool) -> str:
    """The backend for one forward pass: ``'auto'`` under a KV cache (prompt prefill and every
    decoding or denoising step) is SDPA with the dense mask, on every device.

    Why not compiled flex there: a prompt's length is whatever the prompt is, and on an H200
    (torch 2.11) Inductor could not lower flex for a 73-position query at all
    (NoValidChoicesError; contiguous or cached keys, fp32 or bf16 alike, while 25 positions
    ran), so cached CUDA sampling of a Chameleon edit model crashed in its prefill
    (docs/performance.md, "GPU"; `scripts/probe_flex.py` probes a shape). Each cached call also
    has a new key length, so flex would rebuild a block mask per call for a (B, S, K) mask that
    is small anyway. Training rows are padded to fixed lengths and keep ``auto``'s choice, as do
    uncached passes; an explicit ``'flex'`` is respected.
    """
    return "sdpa" if cached and backend == "auto" else backend


# Longest key range for which `attn_backend: auto` runs CPU training in bf16 on SDPA's
# unfused math kernel instead of torch's CPU flash kernel, whose bf16 backward is slow on short
# rows. Forward + backward, 4,096 query positions, H=4, Hkv=2, Dh=64, bf16, 2-core
# CPU, torch 2.13 (docs/performance.md): flash 20 / 23 / 33 / 34 ms against math
# 10 / 16 / 23 / 39 ms at K = 32 / 64 / 128 / 256. Without gradients, or in fp32, flash won at
# every length measured, so those keep torch's choice.
CPU_MATH_MAX_KEYS = 128


def sdpa_kernels(q: Tensor, key_len: int, backend: str) -> contextlib.AbstractContextManager:
    """The SDPA kernel restriction for one call: the math kernel under the rule above for
    ``backend='auto'``, else none (torch's own dispatch; an explicit 'sdpa' always gets it)."""
    if (backend == "auto" and q.device.type == "cpu" and q.requires_grad
            and q.dtype == torch.bfloat16 and key_len <= CPU_MATH_MAX_KEYS
            and not torch.compiler.is_compiling()):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    # Eager flex_attention materialises the full score matrix; only the compiled version is
    # the fused block-sparse kernel. Compiled once per process, on first CUDA use; default
    # (automatic) dynamic shapes, so a growing KV cache recompiles once, not every step.
    return torch.compile(flex_attention)


@functools.cache
def _compiled_create_block_mask() -> Callable[..., BlockMask]:
    # Uncompiled, create_block_mask evaluates mask_mod on the dense (B, S, K) grid.
    return torch.compile(create_block_mask)


@dataclass(eq=False)
class AttentionLayout:
    """Modality map of one batch: who may attend to whom, and the RoPE positions.

    Built once per batch by a family and passed to every layer; the dense mask or BlockMask is
    built lazily on first use and reused by all layers.

    Args:
        doc_ids: (B, S) document id per position, -1 = padding.
        image_ids: (B, S) image id per position, -1 = text / not in an image. Ids only need
            to be distinct among images of the same document.
        positions: (B, S) RoPE position ids, or None for the default: the index within the
            document (restarting at each document start, see `document_positions`), counted
            over the cached prefix too, so decoding continues where the prefix stopped.
            Pass explicit positions when a document's positions are not contiguous in the
            row (e.g. decoding after right-padded prompts of different lengths).
        prefix_doc_ids, prefix_image_ids: (B, P) ids of cached keys preceding these positions.
            Set by `KVCache.attach` through `with_prefix`; callers leave them None.
        query_tile: the SDPA path runs queries in tiles of this many, each against only the
            key range its mask can see (see `sdpa_tiles`).
    """

    doc_ids: Tensor
    image_ids: Tensor
    positions: Tensor | None = None
    prefix_doc_ids: Tensor | None = None
    prefix_image_ids: Tensor | None = None
    query_tile: int = 256

    def __post_init__(self) -> None:
        if self.query_tile <= 0:
            raise ValueError(f"query_tile must be positive, got {self.query_tile}")
        if self.doc_ids.ndim != 2:
            raise ValueError(f"doc_ids must be (B, S), got shape {tuple(self.doc_ids.shape)}")
        for name in ("image_ids", "positions"):
            t = getattr(self, name)
            if t is not None and t.shape != self.doc_ids.shape:
                raise ValueError(
                    f"{name} shape {tuple(t.shape)} != doc_ids shape {tuple(self.doc_ids.shape)}"
                )
        if (self.prefix_doc_ids is None) != (self.prefix_image_ids is None):
            raise ValueError("prefix_doc_ids and prefix_image_ids must be given together")
        if self.prefix_doc_ids is not None:
            shape = self.prefix_doc_ids.shape
            if len(shape) != 2 or shape[0] != self.batch_size:
                raise ValueError(f"prefix ids must be (B={self.batch_size}, P), got {tuple(shape)}")
            if self.prefix_image_ids.shape != shape:
                raise ValueError("prefix_image_ids shape differs from prefix_doc_ids shape")
        for t in (self.doc_ids, self.image_ids, self.positions):
            if t is not None and (t.dtype.is_floating_point or t.dtype == torch.bool):
                raise ValueError(f"layout ids must be integer tensors, got {t.dtype}")

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """S, the number of query positions."""
        return self.doc_ids.shape[1]

    @property
    def prefix_len(self) -> int:
        """P, the number of cached key positions before the queries."""
        return 0 if self.prefix_doc_ids is None else self.prefix_doc_ids.shape[1]

    @property
    def key_len(self) -> int:
        return self.prefix_len + self.seq_len

    def with_prefix(self, prefix_doc_ids: Tensor, prefix_image_ids: Tensor) -> AttentionLayout:
        """The same queries, placed after P cached keys with the given (B, P) ids."""
        if self.prefix_doc_ids is not None:
            raise ValueError("layout already has a prefix")
        return replace(self, prefix_doc_ids=prefix_doc_ids, prefix_image_ids=prefix_image_ids)

    @functools.cached_property
    def key_ids(self) -> tuple[Tensor, Tensor]:
        """(doc_ids, image_ids) of the K keys, each (B, K): prefix followed by the queries."""
        if self.prefix_doc_ids is None:
            return self.doc_ids, self.image_ids
        return (
            torch.cat([self.prefix_doc_ids, self.doc_ids], dim=1),
            torch.cat([self.prefix_image_ids, self.image_ids], dim=1),
        )

    @functools.cached_property
    def rope_positions(self) -> Tensor:
        """(B, S) RoPE position ids: explicit `positions`, else index within the document."""
        if self.positions is not None:
            return self.positions
        return document_positions(self.key_ids[0])[:, self.prefix_len :]

    @functools.cached_property
    def is_plain_causal(self) -> bool:
        """True when the rule reduces to a causal mask (one document per row, no image, no
        padding, no prefix), so SDPA can take its ``is_causal`` fast path. One host sync."""
        if self.prefix_doc_ids is not None:
            return False
        doc = self.doc_ids
        one_doc = (doc == doc[:, :1]) & (doc >= 0)
        return bool((one_doc.all() & (self.image_ids < 0).all()).item())

    @functools.cached_property
    def dense_mask(self) -> Tensor:
        """(B, 1, S, K) boolean mask for SDPA, True = attend."""
        key_doc, key_img = self.key_ids
        q_idx = torch.arange(self.prefix_len, self.key_len, device=self.doc_ids.device)
        k_idx = torch.arange(self.key_len, device=self.doc_ids.device)
        mask = _visible(
            self.doc_ids[:, :, None],
            self.image_ids[:, :, None],
            q_idx[:, None],
            key_doc[:, None, :],
            key_img[:, None, :],
            k_idx[None, :],
        )
        return mask[:, None]

    @functools.cached_property
    def sdpa_tiles(self) -> list[tuple[slice, slice]]:
        """(query slice, key slice) pairs covering the dense mask with its empty blocks cut.

        SDPA with a mask tensor computes every (query, key) pair, while its `is_causal` path
        skips the blocks above the diagonal; on CPU that made the mixed-modal mask ~1.7x
        slower than causal at S=2048 (docs/performance.md). Running each tile of queries
        against only the keys from its first to its last visible one skips those blocks
        (and earlier documents of a packed row) again. One host sync per layout.
        """
        tile = self.query_tile
        visible = self.dense_mask.any(dim=(0, 1))  # (S, K): visible in some row
        n_tiles = -(-self.seq_len // tile)
        visible = F.pad(visible, (0, 0, 0, n_tiles * tile - self.seq_len))
        cols = visible.view(n_tiles, tile, self.key_len).any(dim=1)  # (n_tiles, K)
        first = cols.int().argmax(dim=1)  # every query sees itself: rows are never empty
        last = self.key_len - cols.flip(1).int().argmax(dim=1)
        return [
            (slice(i * tile, (i + 1) * tile), slice(lo, hi))
            for i, (lo, hi) in enumerate(zip(first.tolist(), last.tolist(), strict=True))
        ]

    @functools.cached_property
    def block_mask(self) -> BlockMask:
        """FlexAttention BlockMask for the same rule (heads broadcast)."""
        q_doc, q_img, offset = self.doc_ids, self.image_ids, self.prefix_len
        key_doc, key_img = self.key_ids

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return _visible(
                q_doc[b, q_idx],
                q_img[b, q_idx],
                q_idx + offset,
                key_doc[b, kv_idx],
                key_img[b, kv_idx],
                kv_idx,
            )

        make = _compiled_create_block_mask() if q_doc.is_cuda else create_block_mask
        return make(
            mask_mod, self.batch_size, None, self.seq_len, self.key_len, device=q_doc.device
        )

    def prepare(self, backend: str, head_dim: int | None = None) -> None:
        """Build what `backend` needs now, eagerly, so compiled layers only read a ready mask."""
        if resolve_backend(backend, self.doc_ids.device, head_dim) == "flex":
            self.block_mask  # noqa: B018
        elif not self.is_plain_causal:
            self.sdpa_tiles  # noqa: B018  (builds dense_mask too)


def attend(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, backend: str = "auto"
) -> Tensor:
    """Scaled dot-product attention under the layout's mask.

    q (B, H, S, Dh), k and v (B, Hkv, K, Dh) -> (B, H, S, Dh). Keys are the layout's
    prefix followed by its S positions. Grouped-query attention is handled by the kernels.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q (B, H, S, Dh) and k, v (B, Hkv, K, Dh), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if (q.shape[0], q.shape[2], k.shape[2]) != (layout.batch_size, layout.seq_len, layout.key_len):
        raise ValueError(
            f"attention layout is for B={layout.batch_size}, S={layout.seq_len}, "
            f"K={layout.key_len} but got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads not divisible by {k.shape[1]} key/value heads")
    gqa = q.shape[1] != k.shape[1]
    if resolve_backend(backend, q.device, q.shape[-1]) == "flex":
        # Eager flex_attention is the unfused reference (CPU tests). Inside a compiled region
        # the surrounding torch.compile fuses it; outside one, CUDA uses the compiled kernel.
        fused = q.is_cuda and not torch.compiler.is_compiling()
        flex = _compiled_flex_attention() if fused else flex_attention
        return flex(q, k, v, block_mask=layout.block_mask, enable_gqa=gqa)
    with sdpa_kernels(q, layout.key_len, backend):
        return _sdpa(q, k, v, layout, gqa)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, gqa: bool) -> Tensor:
    if layout.is_plain_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = layout.dense_mask
    if torch.compiler.is_compiling():
        # The tiles' bounds are Python ints: compiled code would guard on them and recompile
        # for every new layout, so it takes the single masked call.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    tiles = [
        F.scaled_dot_product_attention(
            q[:, :, rows],
            k[:, :, keys],
            v[:, :, keys],
            attn_mask=mask[..., rows, keys],
            enable_gqa=gqa,
        )
        for rows, keys in layout.sdpa_tiles
    ]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=2)


def layout_from_segments(
    rows: Sequence[Sequence[Segment]],
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> AttentionLayout:
    """Right-padded layout from per-row segment lists.

    Each row is a list of ``(doc_id, kind, length)`` with kind "text" or "image", e.g.
    ``[(0, "text", 5), (0, "image", 16), (0, "text", 3), (1, "text", 8)]``. Every image
    segment gets its own image id (numbered per row). Rows are padded to ``seq_len``
    (default: the longest row) with doc id -1.
    """
    lengths = [sum(n for _, _, n in row) for row in rows]
    seq_len = max(lengths, default=0) if seq_len is None else seq_len
    if any(n > seq_len for n in lengths):
        raise ValueError(f"a row of length {max(lengths)} does not fit seq_len={seq_len}")
    doc_ids = torch.full((len(rows), seq_len), PAD_DOC, dtype=torch.long)
    image_ids = torch.full((len(rows), seq_len), NO_IMAGE, dtype=torch.long)
    for r, row in enumerate(rows):
        start, n_images = 0, 0
        for doc, kind, n in row:
            if kind not in ("text", "image") or doc < 0 or n < 0:
                raise ValueError(
                    f"bad segment {(doc, kind, n)}: want (doc >= 0, 'text'|'image', n >= 0)"
                )
            doc_ids[r, start : start + n] = doc
            if kind == "image":
                image_ids[r, start : start + n] = n_images
                n_images += 1
            start += n
    return AttentionLayout(doc_ids.to(device), image_ids.to(device))


def reference_mask(doc_ids: Tensor, image_ids: Tensor) -> Tensor:
    """(B, S) ids -> (B, S, S) mask by plain loops; the independent check for tests."""
    batch, seq = doc_ids.shape
    doc, img = doc_ids.tolist(), image_ids.tolist()
    mask = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for q in range(seq):
            for k in range(seq):
                if doc[b][q] < 0:
                    mask[b, q, k] = k == q  # padding query: itself only
                elif doc[b][q] == doc[b][k]:
                    mask[b, q, k] = k <= q or (img[b][q] >= 0 and img[b][q] == img[b][k])
    return mask
