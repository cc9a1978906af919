"""The shared decoder backbone: a Llama-style transformer with Chameleon's stability switches.

It maps input embeddings to final-normed hidden states under a mixed-modal attention layout
and knows nothing of vocabularies or images: the Chameleon and Transfusion families embed
their inputs and read their outputs around it (docs/design.md, Architecture).

Dimension legend
    B    batch size
    S    positions in this call
    P    cached prefix length (KV cache); 0 without a cache
    K    key length = P + S
    D    d_model
    H    query heads
    Hkv  key/value heads (grouped-query attention, H % Hkv == 0)
    Dh   head dimension = D / H
    F    SwiGLU hidden width
    L    number of layers

Blocks are pre-norm (x + f(norm(x))) with RMSNorm, rotary position embeddings (RoPE,
arXiv:2104.09864), SwiGLU feed-forward (arXiv:2002.05202) and grouped-query attention
(arXiv:2305.13245). Chameleon (arXiv:2405.09818, Sec. 2.3) found mixed-modal training
diverges from norm growth and adds, behind switches here:
    qk_norm       LayerNorm of queries and keys per head, before RoPE;
    norm_reorder  "swin-norm": x + norm(f(x)) instead of x + f(norm(x)),
                  which bounds each block's contribution to the residual stream;
    z_loss        a penalty on log Z of the output softmax (`z_loss`, applied by families).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.models.attention import BACKENDS, AttentionLayout, attend, call_backend


@dataclass
class TransformerConfig:
    """Shape and switches of the backbone (defaults = the `tiny` preset).

    ffn_hidden: SwiGLU width F; None = Llama's rule, 2/3 of 4·D rounded up to `multiple_of`
    (keeps the parameter count of a 4·D GELU MLP). attn_backend: "auto" (FlexAttention on
    CUDA, SDPA elsewhere, with the math kernel for short bf16 CPU training rows:
    `fusion.models.attention.sdpa_kernels`), "sdpa" (torch's own kernel choice) or "flex".
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int | None = None
    multiple_of: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # RoPE frequency scaling for long context, as a pretrained checkpoint has it (None = none):
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"} (:func:`rope_frequencies`).
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = False
    norm_reorder: bool = False
    dropout: float = 0.0
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise ValueError(f"ffn_hidden must be positive, got {self.ffn_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(8 * self.d_model / 3 / self.multiple_of)


# Non-embedding parameter counts in the comments (embeddings belong to the families).
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # 3.1 M: tests and CPU demos.
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=2048),
    # 31 M: CPU experiments.
    "small": dict(d_model=512, n_layers=10, n_heads=8, n_kv_heads=4, max_seq_len=2048),
    # 308 M: GPT-3 "350M" shape (arXiv:2005.14165, Table 2.1), ~375 M with an untied 32k vocabulary.
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, max_seq_len=4096),
    # 973 M: Llama 3.2 1B shape.
    "1b": dict(
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=8192,
        rope_theta=500000.0,
        max_seq_len=4096,
    ),
    # 6.5 B: Llama 2 7B shape (arXiv:2307.09288), as Chameleon-7B.
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, max_seq_len=4096),
}


def transformer_config(name: str, **overrides: Any) -> TransformerConfig:
    """A preset from `TRANSFORMER_PRESETS` with some fields replaced."""
    if name not in TRANSFORMER_PRESETS:
        raise ValueError(
            f"unknown transformer preset {name!r}; choose from {list(TRANSFORMER_PRESETS)}"
        )
    return TransformerConfig(**{**TRANSFORMER_PRESETS[name], **overrides})


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def check_rope_scaling(scaling: dict) -> None:
    if scaling.get("type") != "llama3":
        raise ValueError(f"rope_scaling type {scaling.get('type')!r} is not supported; "
                         "only 'llama3' is (or None)")
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type llama3 needs {missing}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0 < scaling["factor"]:
        raise ValueError(f"rope_scaling: want factor > 0 and high_freq_factor > "
                         f"low_freq_factor > 0, got {dict(scaling)}")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device=None) -> Tensor:
    """(Dh/2,) fp32 rotation frequencies θ^(-2i/Dh), optionally scaled for long context.

    ``llama3`` scaling (Llama 3.1, Meta 2024, "The Llama 3 Herd of Models"): with
    L = original_max_position_embeddings, a frequency whose wavelength 2π/f is shorter than
    L/high_freq_factor is kept, one longer than L/low_freq_factor is divided by ``factor``,
    and the ones between blend the two linearly in L/wavelength, so the positions the model
    was trained on keep their fine-grained rotations while slow ones stretch.
    """
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                      / head_dim)
    if scaling is None:
        return freqs
    length, factor = float(scaling["original_max_position_embeddings"]), scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    periods_in_context = length * freqs / (2 * math.pi)  # L / wavelength
    blend = ((periods_in_context - low) / (high - low)).clamp(0.0, 1.0)  # 0 slow .. 1 fast
    return blend * freqs + (1 - blend) * freqs / factor


def rope_angles(positions: Tensor, head_dim: int, theta: float,
                scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """(B, S) integer positions -> cos, sin each (B, 1, S, Dh/2) in fp32.

    Computed from the positions on the fly (no table), so any position id is valid and the
    module has no buffers to move or re-materialise.
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions[:, None, :, None].float() * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, S, Dh) by position, "rotate-half" convention, computed in fp32.

    Rotating channel pairs (i, i + Dh/2) rather than Meta-Llama's interleaved (2i, 2i+1) is
    the same operator up to a fixed permutation of the head dimension.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class HeadLayerNorm(nn.Module):
    """LayerNorm over Dh of (B, H, S, Dh) with a per-head affine, Chameleon's QK-norm."""

    def __init__(self, n_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, 1, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, head_dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        # type_as: autocast runs layer_norm in fp32; q, k and v must share one dtype.
        return (F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias).type_as(x)


class KVCache:
    """Keys and values of a committed prefix, for decoding and for speculative blocks.

    Buffers are preallocated to `max_len` on first use (dtype and device from the first keys
    written) rather than grown by `torch.cat`: appending by cat copies the whole prefix at
    every step (quadratic traffic over a generation) and changes shapes, which defeats CUDA
    graphs and compilation. Preallocation also makes speculative blocks free: an uncommitted
    block is written into the slots after `length`, which stay outside the committed prefix
    and are overwritten by the next call.

    Rows are aligned: all rows share `length`; ragged prompts are padded (doc id -1).
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.n_layers = n_layers
        self.max_len = max_len
        self.length = 0  # P, committed positions
        self.keys: Tensor | None = None  # (L, B, Hkv, max_len, Dh)
        self.values: Tensor | None = None  # (L, B, Hkv, max_len, Dh)
        self.doc_ids: Tensor | None = None  # (B, max_len)
        self.image_ids: Tensor | None = None  # (B, max_len)
        self._pending = 0  # S of the forward pass in flight
        self._attached: tuple[AttentionLayout, int, AttentionLayout] | None = None

    def reset(self) -> None:
        """Forget the prefix (buffers are kept)."""
        self.length = 0
        self._attached = None

    def attach(self, layout: AttentionLayout) -> AttentionLayout:
        """Record the ids of `layout`'s positions after the prefix and return the layout with
        the prefix as extra keys. Reattaching the same layout object (a diffusion sampler's
        denoising steps) reuses the already built masks."""
        if layout.prefix_len:
            raise ValueError("pass the layout of the new positions only; the cache adds its prefix")
        if self._attached is not None and self._attached[:2] == (layout, self.length):
            self._pending = layout.seq_len
            return self._attached[2]
        batch, seq = layout.doc_ids.shape
        if self.doc_ids is None:
            self.doc_ids = torch.full((batch, self.max_len), -1, device=layout.doc_ids.device)
            self.image_ids = torch.full_like(self.doc_ids, -1)
        if batch != self.doc_ids.shape[0]:
            raise ValueError(f"cache holds batch {self.doc_ids.shape[0]}, got layout batch {batch}")
        end = self.length + seq
        if end > self.max_len:
            raise ValueError(
                f"cache overflow: {self.length} cached + {seq} new > max_len={self.max_len}"
            )
        self.doc_ids[:, self.length : end] = layout.doc_ids
        self.image_ids[:, self.length : end] = layout.image_ids
        attached = layout.with_prefix(
            self.doc_ids[:, : self.length], self.image_ids[:, : self.length]
        )
        self._attached, self._pending = (layout, self.length, attached), seq
        return attached

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new (B, Hkv, S, Dh) keys/values of `layer` after the prefix and return
        prefix + new, each (B, Hkv, P + S, Dh)."""
        if self.keys is None:
            batch, n_kv, _, head_dim = k.shape
            shape = (self.n_layers, batch, n_kv, self.max_len, head_dim)
            self.keys = k.new_zeros(shape)
            self.values = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def commit(self) -> None:
        """Make the positions of the last forward pass part of the prefix."""
        self.length += self._pending
        self._pending = 0


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and optional QK-norm."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.backend = cfg.attn_backend
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        if cfg.qk_norm:
            self.q_norm = HeadLayerNorm(cfg.n_heads, cfg.head_dim, cfg.norm_eps)
            self.k_norm = HeadLayerNorm(cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layout: AttentionLayout,
        cache: KVCache | None = None,
    ) -> Tensor:
        # x (B, S, D) -> (B, S, D)
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # QK-norm before RoPE (Chameleon): normalise content, then rotate by position.
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, P + S, Dh)
        out = attend(q, k, v, layout, call_backend(self.backend, cache is not None))  # (B, H, S, Dh)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # (B, S, D) -> (B, S, F) -> (B, S, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm_reorder = cfg.norm_reorder
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_dim)
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x: Tensor, branch: Callable[[Tensor], Tensor], norm: nn.Module) -> Tensor:
        if self.norm_reorder:  # Chameleon swin-norm: normalise the branch output
            return x + self.dropout(norm(branch(x)))
        return x + self.dropout(branch(norm(x)))

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layout: AttentionLayout,
        cache: KVCache | None = None,
    ) -> Tensor:
        # x (B, S, D) -> (B, S, D)
        x = self._residual(x, lambda h: self.attention(h, rope, layout, cache), self.attention_norm)
        return self._residual(x, self.feed_forward, self.ffn_norm)


class Transformer(nn.Module):
    """Input embeddings (B, S, D) + attention layout -> final-normed hidden states (B, S, D).

    Training / full pass: ``model(x, layout)``.
    With a cache (``cache = model.new_cache()``):
      * decoding: ``model(x_new, layout_new, cache=cache)`` attends over prefix + new and
        appends the new positions (one or many) to the prefix;
      * speculative block: ``model(x_block, layout_block, cache=cache, commit=False)``
        attends over prefix + block without changing the prefix, so a diffusion sampler can
        evaluate every denoising step against a prefix computed once, then commit the final
        block with ``commit=True``.
    RoPE positions of new positions continue the prefix's (see `AttentionLayout`).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) projections; norms to identity.

        The 2·L output projections (attention `wo`, SwiGLU `w2`) each add a term to the
        residual stream, so at init its variance grows with depth; scaling their std by
        1/sqrt(2·L) (GPT-2, Radford et al. 2019; Llama/OLMo "depth-scaled" init) keeps the
        stream's scale, and so the useful learning rate, roughly independent of L. Under
        `norm_reorder` each branch is normalised anyway and the scaling is harmless.
        """
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (nn.RMSNorm, HeadLayerNorm)):
                module.reset_parameters()
        for layer in self.layers:
            nn.init.normal_(layer.attention.wo.weight, std=out_std)
            nn.init.normal_(layer.feed_forward.w2.weight, std=out_std)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to `max_len` positions (default cfg.max_seq_len)."""
        return KVCache(self.cfg.n_layers, max_len or self.cfg.max_seq_len)

    def forward(
        self,
        x: Tensor,
        layout: AttentionLayout,
        cache: KVCache | None = None,
        commit: bool = True,
    ) -> Tensor:
        # x (B, S, D), layout over (B, S) -> (B, S, D)
        if x.ndim != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected input (B, S, D={self.cfg.d_model}), got {tuple(x.shape)}")
        if x.shape[:2] != layout.doc_ids.shape:
            raise ValueError(
                f"layout is for (B, S) = {tuple(layout.doc_ids.shape)} but input is {tuple(x.shape[:2])}"
            )
        if cache is not None:
            layout = cache.attach(layout)
        elif not commit:
            raise ValueError("commit=False only makes sense with a cache")
        if layout.key_len > self.cfg.max_seq_len:
            raise ValueError(
                f"{layout.key_len} positions exceed max_seq_len={self.cfg.max_seq_len}"
            )
        layout.prepare(call_backend(self.cfg.attn_backend, cache is not None), self.cfg.head_dim)
        rope = rope_angles(layout.rope_positions, self.cfg.head_dim, self.cfg.rope_theta,
                           self.cfg.rope_scaling)
        for layer in self.layers:
            x = layer(x, rope, layout, cache)
        if cache is not None and commit:
            cache.commit()
        return self.norm(x)


def z_loss(logits: Tensor, weight: float = 1e-5, mask: Tensor | None = None) -> Tensor:
    """weight · mean(logsumexp(logits)²) over the positions where `mask` is True.

    Keeps the softmax normaliser log Z near 0, which Chameleon (arXiv:2405.09818, Sec. 2.3)
    needed against logit drift in mixed-modal training (PaLM's z-loss, arXiv:2204.02311).
    logits (..., V), mask (...) bool or None (all positions).
    """
    log_z_sq = torch.logsumexp(logits.float(), dim=-1).square()
    if mask is None:
        return weight * log_z_sq.mean()
    # Masked mean without boolean indexing (no host sync); 0 when nothing is selected.
    return weight * (log_z_sq * mask).sum() / mask.sum().clamp_min(1)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flops_per_token(cfg: TransformerConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs (forward + backward) per token: 6·N + attention.

    6·N counts the matmuls against N parameters (Kaplan et al. 2020, arXiv:2001.08361).
    Scores QKᵀ and the weighted sum of values cost 2·S·D FLOPs each per token and layer in
    the forward pass, ×3 for forward + backward: 12·L·D·S (PaLM, arXiv:2204.02311, App. B),
    halved here because a causal mask leaves half the (query, key) pairs. Image blocks make the
    mixed-modal mask slightly denser; the same count is used for both so time ratios and
    FLOP/s ratios agree.
    """
    return 6 * n_params + 6 * cfg.n_layers * cfg.d_model * seq_len


def matmul_parameters(model: nn.Module) -> int:
    """The parameters that take part in matrix products: every parameter but the embedding
    tables read by index (a table tied to an output head is a product's weight, counted once).
    This is the N of :func:`flops_per_token` for a whole family model."""
    products = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - products
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups)


def training_flops_per_position(model: nn.Module, row_len: int) -> float:
    """Training FLOPs (forward + backward) per packed position of a family model
    (``model.transformer``: its shared :class:`Transformer`) in rows of ``row_len``:
    :func:`flops_per_token` with N = :func:`matmul_parameters`. Every position, text or image,
    is charged the whole model, as in the Transfusion paper's FLOP counts (arXiv:2408.11039,
    Sec. 4.1); the frozen image tokenizer is not counted."""
    return flops_per_token(model.transformer.cfg, row_len, matmul_parameters(model))
