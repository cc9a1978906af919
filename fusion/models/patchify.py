"""Patchifiers: VAE latents <-> transformer positions for the Transfusion family.

Transfusion (Zhou et al. 2024, arXiv:2408.11039, sec. 3.2 and 4.3) puts one of two small
networks between the VAE latent and the transformer, trained with the transformer (not with
the VAE):

* ``linear``: each p×p patch of the latent is flattened and linearly projected to d_model;
  on the way out a linear layer maps each hidden state back to a p×p×C patch;
* ``unet``: the down blocks of a U-Net compress the latent to the token grid, the up blocks
  (with skip connections from the down path) expand the transformer's output back. The paper
  finds it markedly better for image quality at small transformer sizes, for few extra
  parameters.

In both, the diffusion timestep conditions the image tokens: Transfusion adds an embedding
of t to every patch vector (``linear``); the U-Net's resnets take it as their ``temb``, as
in DDPM's U-Net (Ho et al. 2020). Timesteps are in the noise scheduler's units (e.g.
0..999 for DDPM's 1000 steps; floats allowed), embedded by diffusers' sinusoidal
``Timesteps`` and the ``TimestepEmbedding`` MLP.

Shapes::

    B  batch                 C  latent channels       h, w  latent grid (e.g. 8×8 for f8 at 64 px)
    p  patch size            g_h, g_w = h / p, w / p  token grid     N = g_h·g_w tokens/image
    D  d_model               c_i  U-Net channels of level i

    latent  (B, C, h, w)  ->  patchify(latent, t)  ->  tokens (B, N, D), skips
    hidden  (B, N, D)     ->  unpatchify(hidden, t, skips)  ->  (B, C, h, w)

Tokens are in row-major order of the token grid (row 0 left to right, then row 1, ...).

``skips`` carries what ``unpatchify`` needs from ``patchify`` of the *same* latent: nothing
for ``linear`` (an empty tuple), the down path's feature maps for ``unet``. A caller keeps
it between the two calls, e.g. per image span of a batch::

    tokens, skips = patchifier.patchify(noisy_latent, t)   # into the transformer
    hidden = transformer(... tokens ...)
    eps_hat = patchifier.unpatchify(hidden, t, skips)       # (B, C, h, w) prediction
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_up_block
from einops import rearrange
from torch import nn

from fusion.models.positions import GridPositionEmbedding

Skips = tuple[torch.Tensor, ...]

PATCHIFIER_KINDS = ("linear", "unet")


def latent_to_patches(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, N, p·p·C), row-major over the token grid; a pure rearrange."""
    return rearrange(
        latent, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=patch_size, p2=patch_size
    )


def patches_to_latent(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int]
) -> torch.Tensor:
    """(B, N, p·p·C) -> (B, C, h, w): the exact inverse of :func:`latent_to_patches`."""
    return rearrange(
        patches,
        "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)",
        gh=grid[0],
        gw=grid[1],
        p1=patch_size,
        p2=patch_size,
    )


class Patchifier(nn.Module):
    """What both kinds share: the token-grid geometry and the timestep embedding."""

    def __init__(
        self,
        latent_channels: int,
        latent_size: int | Sequence[int],
        d_model: int,
        patch_size: int,
        time_channels: int,
        time_embed_dim: int,
    ):
        super().__init__()
        hw = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        if any(s % patch_size for s in hw):
            raise ValueError(f"latent size {hw} is not divisible by patch_size={patch_size}")
        self.latent_channels, self.latent_hw = latent_channels, hw
        self.d_model, self.patch_size = d_model, patch_size
        # t -> sinusoid (time_channels) -> MLP (time_embed_dim); DDPM / diffusers UNet2DModel.
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, time_embed_dim)

    @property
    def grid(self) -> tuple[int, int]:
        """(g_h, g_w): the token grid of the latent size this patchifier was built for."""
        return self.latent_hw[0] // self.patch_size, self.latent_hw[1] // self.patch_size

    def tokens_per_image(self, latent_hw: int | Sequence[int] | None = None) -> int:
        """N for a latent of ``latent_hw`` (default: the built size)."""
        hw = (
            self.latent_hw
            if latent_hw is None
            else ((latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(latent_hw))
        )
        if tuple(hw) != self.latent_hw:
            raise ValueError(
                f"this patchifier was built for {self.latent_hw} latents (its "
                f"position embedding is that size), got {tuple(hw)}"
            )
        return self.grid[0] * self.grid[1]

    def embed_time(self, t: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
        """t: scalar or (B,) -> (B, time_embed_dim)."""
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"expected timesteps of shape ({batch},) or a scalar, got {tuple(t.shape)}"
            )
        # Timesteps returns float32; cast to the activations' dtype (bf16 under autocast).
        return self.time_embedding(self.time_proj(t).to(like.dtype))

    def _check_latent(self, latent: torch.Tensor) -> None:
        if (
            latent.ndim != 4
            or latent.shape[1] != self.latent_channels
            or tuple(latent.shape[-2:]) != self.latent_hw
        ):
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, "
                f"{self.latent_hw[0]}, {self.latent_hw[1]}), got "
                f"{tuple(latent.shape)}"
            )

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        n = self.tokens_per_image()
        if hidden.ndim != 3 or hidden.shape[1:] != (n, self.d_model):
            raise ValueError(
                f"expected hidden states (B, {n}, {self.d_model}), got {tuple(hidden.shape)}"
            )

    def patchify(self, latent: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, Skips]:
        raise NotImplementedError

    def unpatchify(
        self, hidden: torch.Tensor, t: torch.Tensor | float, skips: Skips = ()
    ) -> torch.Tensor:
        raise NotImplementedError


class LinearPatchifier(Patchifier):
    """p×p patches -> Linear -> + learned 2-D position + timestep embedding; Linear back.

    The position embedding is factorised, row(i) + column(j) (ViT's "2-D" variant,
    Dosovitskiy et al. 2021, appendix D.4): it tells the transformer where each patch sits
    inside its image (the transformer's own positions are 1-D over the whole sequence).

    ``unpatchify`` is a plain Linear; it ignores ``t`` and ``skips`` (accepted so both kinds
    share one call). The output layer starts at zero, so the first prediction is 0 (DiT's
    zero-initialised final layer, Peebles & Xie 2023, arXiv:2212.09748).

    Identity: :func:`latent_to_patches` / :func:`patches_to_latent` are exact inverses.
    The learned pair is the identity only if ``proj_out`` inverts ``proj_in`` and the added
    embeddings are zero; trained, nothing asks it to be (the transformer sits in between).
    """

    def __init__(
        self,
        latent_channels: int,
        latent_size: int | Sequence[int],
        d_model: int,
        patch_size: int = 2,
    ):
        patch_dim = latent_channels * patch_size * patch_size
        super().__init__(
            latent_channels,
            latent_size,
            d_model,
            patch_size,
            time_channels=256,
            time_embed_dim=d_model,
        )  # DiT's 256 freqs
        gh, gw = self.grid
        self.proj_in = nn.Linear(patch_dim, d_model)
        self.pos = GridPositionEmbedding((gh, gw), d_model)
        self.proj_out = nn.Linear(d_model, patch_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def position_embedding(self) -> torch.Tensor:
        """(N, D), row-major like the tokens."""
        return self.pos.table()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before the table moved into GridPositionEmbedding named it pos_row/pos_col.
        for old, new in (("pos_row", "pos.row"), ("pos_col", "pos.col")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def patchify(self, latent: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, Skips]:
        """latent (B, C, h, w), t (B,) -> tokens (B, N, D), ()"""
        self._check_latent(latent)
        tokens = self.proj_in(latent_to_patches(latent, self.patch_size))  # (B, N, D)
        temb = self.embed_time(t, latent.shape[0], tokens)  # (B, D)
        return tokens + self.position_embedding() + temb[:, None, :], ()

    def unpatchify(
        self, hidden: torch.Tensor, t: torch.Tensor | float = 0, skips: Skips = ()
    ) -> torch.Tensor:
        """hidden (B, N, D) -> (B, C, h, w)"""
        self._check_hidden(hidden)
        return patches_to_latent(self.proj_out(hidden), self.patch_size, self.grid)


class UNetPatchifier(Patchifier):
    """U-Net down blocks to the token grid, up blocks with skips back (Transfusion sec. 3.2).

    Built from diffusers' ``DownBlock2D`` / ``UpBlock2D`` (resnets that take a timestep
    embedding), wired as in diffusers' ``UNet2DModel`` minus its mid block: the transformer
    is the middle. ``len(block_out_channels) = log2(patch_size) + 1`` levels; every level
    but the last halves the grid, so a p×p patch of the latent becomes one token.

        latent (B, C, h, w) -conv_in-> (B, c_0, h, w) -down...-> (B, c_L, g_h, g_w)
                 -1×1 proj-> tokens (B, N, D)
        hidden (B, N, D) -1×1 proj-> (B, c_L, g_h, g_w) -up (+skips)...-> (B, c_0, h, w)
                 -norm, SiLU, conv_out-> (B, C, h, w)
    """

    def __init__(
        self,
        latent_channels: int,
        latent_size: int | Sequence[int],
        d_model: int,
        patch_size: int = 2,
        block_out_channels: Sequence[int] | None = None,
        layers_per_block: int = 1,
        norm_num_groups: int = 32,
    ):
        levels = math.log2(patch_size) + 1
        if patch_size < 1 or levels != int(levels):
            raise ValueError(f"unet patch_size must be a power of two, got {patch_size}")
        levels = int(levels)
        channels = tuple(block_out_channels or [min(128 * 2**i, 512) for i in range(levels)])
        if len(channels) != levels:
            raise ValueError(
                f"patch_size={patch_size} needs {levels} U-Net levels, got "
                f"block_out_channels={channels}"
            )
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {channels}: {bad} not divisible by "
                f"norm_num_groups={norm_num_groups}"
            )
        temb = 4 * channels[0]  # UNet2DModel's time_embed_dim
        super().__init__(
            latent_channels,
            latent_size,
            d_model,
            patch_size,
            time_channels=channels[0],
            time_embed_dim=temb,
        )
        self.block_out_channels = channels
        common = dict(
            temb_channels=temb, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=norm_num_groups
        )
        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.down_blocks.append(
                get_down_block(
                    "DownBlock2D",
                    num_layers=layers_per_block,
                    in_channels=prev,
                    out_channels=ch,
                    add_downsample=i < levels - 1,
                    downsample_padding=1,
                    **common,
                )
            )
            prev = ch
        self.to_tokens = nn.Linear(channels[-1], d_model)
        self.from_tokens = nn.Linear(d_model, channels[-1])
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(channels))
        out_ch = rev[0]
        for i in range(levels):
            prev_out, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, levels - 1)]
            # One more resnet than on the way down: the extra one eats conv_in's skip
            # (UNet2DModel's layout).
            self.up_blocks.append(
                get_up_block(
                    "UpBlock2D",
                    num_layers=layers_per_block + 1,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    prev_output_channel=prev_out,
                    add_upsample=i < levels - 1,
                    resolution_idx=i,
                    **common,
                )
            )
        self.norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=1e-5)
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # first prediction 0, as for the linear kind
        nn.init.zeros_(self.conv_out.bias)

    def patchify(self, latent: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, Skips]:
        """latent (B, C, h, w), t (B,) -> tokens (B, N, D), skips (the down path's maps)"""
        self._check_latent(latent)
        x = self.conv_in(latent)
        temb = self.embed_time(t, latent.shape[0], x)
        skips: list[torch.Tensor] = [x]
        for block in self.down_blocks:
            x, res = block(x, temb)
            skips.extend(res)
        tokens = self.to_tokens(rearrange(x, "b c gh gw -> b (gh gw) c"))
        return tokens, tuple(skips)

    def unpatchify(
        self, hidden: torch.Tensor, t: torch.Tensor | float, skips: Skips
    ) -> torch.Tensor:
        """hidden (B, N, D), t (B,), skips from ``patchify`` -> (B, C, h, w)"""
        self._check_hidden(hidden)
        n_needed = sum(len(b.resnets) for b in self.up_blocks)
        if len(skips) != n_needed:
            raise ValueError(
                f"unet unpatchify needs the {n_needed} skip tensors that "
                f"patchify returned for the same latents, got {len(skips)}"
            )
        gh, gw = self.grid
        x = rearrange(self.from_tokens(hidden), "b (gh gw) c -> b c gh gw", gh=gh, gw=gw)
        temb = self.embed_time(t, hidden.shape[0], x)
        rest = list(skips)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, rest = tuple(rest[-k:]), rest[:-k]
            x = block(x, res, temb)
        return self.conv_out(self.act_out(self.norm_out(x)))


def build_patchifier(
    kind: str, latent_channels: int, latent_size: int | Sequence[int], d_model: int, **kw
) -> Patchifier:
    """``kind``: ``linear`` (kw: patch_size) or ``unet`` (kw: patch_size, block_out_channels,
    layers_per_block, norm_num_groups)."""
    if kind == "linear":
        return LinearPatchifier(latent_channels, latent_size, d_model, **kw)
    if kind == "unet":
        return UNetPatchifier(latent_channels, latent_size, d_model, **kw)
    raise ValueError(f"unknown patchifier kind {kind!r}; expected one of {PATCHIFIER_KINDS}")
