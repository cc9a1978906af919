"""VQTokenizer: the discrete image tokenizer (VQ-GAN) of the Chameleon family.

A VQ-GAN (Esser et al. 2021, arXiv:2012.09841) is a convolutional autoencoder with a
quantiser in the bottleneck: every position of the encoder's (h, w) feature map becomes one
integer code, and an image becomes h·w tokens that Chameleon appends to its text vocabulary.
Here it is assembled from library parts (docs/design.md, Principles):

* encoder / decoder: diffusers' ``Encoder`` / ``Decoder`` (the taming/LDM ResNet stacks that
  ``AutoencoderKL`` and ``VQModel`` are made of), attention in the mid block at the lowest
  resolution, f = 2 ** (levels - 1);
* quantiser, chosen by config, from vector-quantize-pytorch (:class:`Quantizer`):
  ``vq``  -- ``VectorQuantize`` with low-dimensional l2-normalised codes, EMA codebook and
             dead-code expiry (LlamaGen, Sun et al. 2024, arXiv:2406.06525); configured by
             :func:`frozen_codebook_quantizer` it is taming's plain nearest-neighbour
             Euclidean codebook instead (a converted VQ-GAN, ``fusion.convert.taming``);
  ``fsq`` -- ``FSQ``, finite scalar quantisation (Mentzer et al. 2023, arXiv:2309.15505);
  ``lfq`` -- ``LFQ``, lookup-free quantisation (MAGVIT-v2, Yu et al. 2023, arXiv:2310.05737).

Optionally (``quant_conv_channels``, off unless set) taming's two 1x1 convolutions sit
around the quantiser: ``quant_conv`` (C -> D) after the encoder and ``post_quant_conv``
(D -> C) before the decoder, so the codebook's width D is free of the encoder's C. A VQ-GAN
converted from taming-transformers (Chameleon's) has them; a fresh fusion one does not
need them (the quantiser projects by itself).

Shapes::

    B  batch              H, W  image height/width (pixels)
    C  latent channels    h, w  code grid = (H, W) / f, f = downsample_factor
    N  h·w codes per image K     codebook size
    D  code channels: quant_conv_channels, else C

    images (B, 3, H, W) float in [-1, 1]
    codes  (B, h, w) int64 in [0, K)
    z      (B, C, h, w) float: encoder output
    zq     (B, D, h, w) float: the quantised features (of quant_conv(z) when present)

No training logic lives here (docs/design.md, Principles): ``fusion.training.tokenizer_module``
trains the tokenizer through :meth:`VQTokenizer.forward` (the stage-1 interface shared with
the VAE) against ``fusion.image.losses.AutoencoderLoss``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from fusion.image.artifacts import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ImageTokenizer,
    TokenizerLoadError,
    eval_mode,
    load_weights,
    read_json,
)

log = logging.getLogger(__name__)

FORMAT = "fusion.vqgan"
FORMAT_VERSION = 1
KIND = "vqgan"
QUANTIZERS = ("vq", "fsq", "lfq")
AUTOENCODER_DEFAULTS = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1,
                        "latent_channels": 32, "norm_num_groups": 32,
                        "mid_block_add_attention": True, "norm": "group",
                        "quant_conv_channels": None}
NORMS = ("group", "batch")


class RunningNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation (Ioffe & Szegedy 2015, arXiv:1502.03167) over (batch, positions)
    per channel, for inputs (B, C, ...) of any rank, with GroupNorm's affine parameters.

    Why: GroupNorm's mean and variance span the whole image, so changing a few pixels shifts
    every feature a little and flips codes that sit near an FSQ rounding boundary anywhere in
    the grid. In eval mode (how a frozen tokenizer encodes) this norm uses running statistics
    instead, fixed numbers, so a code depends only on the pixels in its encoder's receptive
    field (docs/tokenizers.md, "Local codes"). Training still normalises with batch
    statistics."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 3:
            raise ValueError(f"RunningNorm expects (B, C, ...) feature maps, got {x.dim()}-D")


def use_running_norm(module: nn.Module) -> None:
    """Replace every ``nn.GroupNorm`` inside ``module`` by a :class:`RunningNorm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, RunningNorm(child.num_channels, eps=child.eps))
        else:
            use_running_norm(child)


# --------------------------------------------------------------------------------------------
# The quantiser: three library quantisers behind one interface
# --------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """A vector-quantize-pytorch quantiser on (B, N, C) features, behind one interface; one
    small subclass per library quantiser, picked by ``quantizer.kind`` (:data:`QUANTIZERS`).

    ``forward(z) -> (zq, codes, aux)``: zq (B, N, C) carries straight-through (or
    rotation-trick) gradients to the encoder, codes (B, N) int64, aux the quantiser's own
    loss as ``{"codebook": scalar}`` (already weighted by the library: VQ's β·commitment,
    LFQ's entropy + commitment; FSQ has none). ``lookup(codes) -> zq`` inverts the codes.

    Feature maps are flattened to (B, N, C) by the caller: with ``accept_image_fmap=True`` and
    a projection (``codebook_dim != C``) ``VectorQuantize.get_output_from_indices`` moves the
    channel axis before projecting and fails, so no quantiser here sees a map.
    """

    kind = ""
    library: type[nn.Module]

    def __init__(self, dim: int, **args):
        super().__init__()
        self.dim, self.args = dim, dict(args)
        self.q = self.library(dim=dim, **args)

    @property
    def codebook_size(self) -> int:
        return int(self.q.codebook_size)

    def forward(self, z: torch.Tensor, update_codebook: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, N, C) -> (zq (B, N, C), codes (B, N) int64, aux). ``update_codebook=False``
        keeps a learned codebook untouched even in train mode: encoding must not move it."""
        zq, codes, loss = self.q(z)
        return zq, codes.long(), {"codebook": loss}

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) int64 -> zq (B, N, C), what :meth:`forward` gives for those codes."""
        return self.q.indices_to_codes(codes)


class VQQuantizer(Quantizer):
    """LlamaGen §3.1: codes of dimension 8, l2-normalised, so that the nearest code is the most
    cosine-similar one -- with a 1-2k codebook this keeps usage near 100 %. The codebook moves
    by EMA (decay) instead of a codebook loss, and a code whose EMA count drops below
    threshold_ema_dead_code is re-seeded from the batch."""

    kind, library = "vq", VectorQuantize

    def forward(self, z, update_codebook=True):
        zq, codes, loss = self.q(z, freeze_codebook=not update_codebook)
        return zq, codes.long(), {"codebook": loss}

    def lookup(self, codes):
        return self.q.get_output_from_indices(codes)

    @torch.no_grad()
    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Write the K x D code vectors (what :meth:`lookup` returns), e.g. a converted
        codebook. The library's EMA statistics are reset to its own fresh state for that
        codebook (cluster sizes 1, running sums = the codes), so a later EMA update starts
        from these codes rather than from the random ones they replace."""
        current = self.q.codebook
        if tuple(codebook.shape) != tuple(current.shape):
            raise ValueError(f"codebook of shape {tuple(codebook.shape)} does not fit this "
                             f"quantiser's {tuple(current.shape)} (codebook_size x dim)")
        self.q.codebook = codebook.to(current)  # the library's setter copies in place
        inner = self.q._codebook
        if hasattr(inner, "embed_avg") and hasattr(inner, "cluster_size"):
            inner.cluster_size.fill_(1.0)
            inner.embed_avg.copy_(inner.embed)


def frozen_codebook_quantizer(codebook_size: int, dim: int, commitment_weight: float = 0.25
                              ) -> dict:
    """The ``quantizer`` config of taming's VQ (Esser et al. 2021): a plain K x ``dim``
    Euclidean codebook that never moves.

    Each choice, checked against vector-quantize-pytorch's source:

    * ``codebook_dim = dim``: no ``project_in`` / ``project_out`` (they exist only when the
      two differ), so :meth:`VQQuantizer.lookup` returns the code vectors themselves;
    * ``use_cosine_sim = False``: no l2 normalisation of inputs or codes; the code is the
      argmax of ``-cdist`` = the argmin of the L2 distance (in eval mode; training samples
      no noise either, ``stochastic_sample_codes`` being off);
    * ``ema_update = False`` and ``threshold_ema_dead_code = 0``: the library's codebook
      update returns before touching anything, and the codebook is a buffer (not
      ``learnable_codebook``), so no optimiser moves it either: frozen in every mode;
    * ``kmeans_init = False``: no data-dependent initialisation overwrites written codes;
    * ``rotation_trick = False``: taming's straight-through gradient to the encoder, with
      its β-weighted commitment term (``commitment_weight``, taming's β = 0.25).
    """
    return {"kind": "vq", "codebook_size": int(codebook_size), "codebook_dim": int(dim),
            "use_cosine_sim": False, "kmeans_init": False, "ema_update": False,
            "threshold_ema_dead_code": 0, "rotation_trick": False,
            "commitment_weight": float(commitment_weight)}


class FSQQuantizer(Quantizer):
    """Finite scalar quantisation: an implicit codebook of prod(levels) codes, no loss."""

    kind, library = "fsq", FSQ

    def forward(self, z, update_codebook=True):
        zq, codes = self.q(z)
        return zq, codes.long(), {}


class LFQQuantizer(Quantizer):
    """Lookup-free quantisation: codebook_size = 2 ** bits, with an entropy penalty."""

    kind, library = "lfq", LFQ


QUANTIZER_CLASSES: dict[str, type[Quantizer]] = {
    q.kind: q for q in (VQQuantizer, FSQQuantizer, LFQQuantizer)}


def build_quantizer(dim: int, kind: str = "fsq", **args) -> Quantizer:
    """The quantiser of ``kind`` (``vq`` | ``fsq`` | ``lfq``) on ``dim``-channel features."""
    if kind not in QUANTIZER_CLASSES:
        raise ValueError(f"unknown quantizer kind {kind!r}; expected one of {QUANTIZERS}")
    return QUANTIZER_CLASSES[kind](dim, **args)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage and perplexity of a code histogram ``counts`` (K,).

    usage: share of the K codes used at least once; perplexity: exp(entropy) of the code
    distribution, the number of equally likely codes with the same entropy (K at best).
    """
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return {}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()),
            "codebook_perplexity": float(entropy.exp())}


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
class VQTokenizer(ImageTokenizer):
    """Images <-> (h, w) integer codes: encoder -> quantiser -> decoder.

    Args:
        autoencoder: ``VQAutoencoderConfig`` fields (``block_out_channels``,
            ``layers_per_block``, ``latent_channels``, ``norm_num_groups``,
            ``mid_block_add_attention``, ``norm``) and ``quant_conv_channels`` (D: taming's
            1x1 convs around the quantiser, None = none); missing ones take
            :data:`AUTOENCODER_DEFAULTS` (so artifacts saved before ``norm`` existed load
            with GroupNorm, as they were trained, and those saved before
            ``quant_conv_channels`` existed load without the convs they never had).
        quantizer: ``{"kind": "vq" | "fsq" | "lfq", **that quantiser's arguments}`` (the
            fields of ``VQConfig`` / ``FSQConfig`` / ``LFQConfig``).
        info: provenance and held-out figures, saved in ``config.json``.
    """

    kind_name, artifact_format = "VQ-GAN", FORMAT

    def __init__(self, autoencoder: dict | None = None, quantizer: dict | None = None,
                 info: dict | None = None):
        super().__init__()
        ae = {**AUTOENCODER_DEFAULTS, **(autoencoder or {})}
        unknown = set(ae) - set(AUTOENCODER_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown autoencoder arguments {sorted(unknown)}; expected "
                             f"{sorted(AUTOENCODER_DEFAULTS)}")
        ae["block_out_channels"] = [int(c) for c in ae["block_out_channels"]]
        if ae["norm"] not in NORMS:
            raise ValueError(f"unknown autoencoder norm {ae['norm']!r}; expected one of {NORMS}")
        bad = [c for c in ae["block_out_channels"] if c % ae["norm_num_groups"]]
        if bad and ae["norm"] == "group":
            raise ValueError(f"block_out_channels {ae['block_out_channels']}: {bad} not "
                             f"divisible by norm_num_groups={ae['norm_num_groups']} (GroupNorm)")
        d = ae["quant_conv_channels"]
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"quant_conv_channels={d!r}: expected a positive int or None")
        quantizer = dict(quantizer or {"kind": "fsq", "levels": [8, 5, 5, 5]})
        self.autoencoder_config, self.quantizer_config = ae, quantizer
        levels, c = len(ae["block_out_channels"]), int(ae["latent_channels"])
        common = dict(block_out_channels=tuple(ae["block_out_channels"]),
                      layers_per_block=ae["layers_per_block"],
                      norm_num_groups=ae["norm_num_groups"],
                      mid_block_add_attention=ae["mid_block_add_attention"])
        # double_z=False: one feature map to quantise, not AutoencoderKL's (mean, logvar).
        self.encoder = Encoder(in_channels=3, out_channels=c, double_z=False,
                               down_block_types=("DownEncoderBlock2D",) * levels, **common)
        # taming's 1x1 convs: the encoder's C channels -> the codebook's D and back.
        self.quant_conv = nn.Conv2d(c, d, 1) if d is not None else None
        self.post_quant_conv = nn.Conv2d(d, c, 1) if d is not None else None
        self.quantizer = build_quantizer(self.code_channels, **quantizer)
        self.decoder = Decoder(in_channels=c, out_channels=3,
                               up_block_types=("UpDecoderBlock2D",) * levels, **common)
        if ae["norm"] == "batch":  # diffusers builds GroupNorms; swap the encoder's (the
            use_running_norm(self.encoder)  # codes' locality is the encoder's alone)
        # Codes chosen in training forward passes since the last pop_code_stats(): a running
        # histogram for the usage/perplexity logs (not saved; no effect on the model).
        self.register_buffer("code_counts", torch.zeros(self.codebook_size, dtype=torch.long),
                             persistent=False)
        self.info: dict = dict(info or {})

    # ---- geometry ----------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder_config["latent_channels"])

    @property
    def code_channels(self) -> int:
        """D: the width of the quantised features (``quant_conv_channels``, else C)."""
        d = self.autoencoder_config["quant_conv_channels"]
        return self.latent_channels if d is None else int(d)

    @property
    def block_out_channels(self) -> list[int]:
        return list(self.autoencoder_config["block_out_channels"])

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where taming's adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    # ---- the tokenizer interface -------------------------------------------------------
    def _quantize(self, images: torch.Tensor, update_codebook: bool = True):
        """images -> (zq (B, D, h, w), codes (B, h, w), aux)."""
        self._check_images(images)
        z = self.encoder(images)  # (B, C, h, w)
        if self.quant_conv is not None:
            z = self.quant_conv(z)  # (B, D, h, w)
        b, d, h, w = z.shape
        zq, codes, aux = self.quantizer(z.flatten(2).transpose(1, 2), update_codebook)
        return zq.transpose(1, 2).reshape(b, d, h, w), codes.view(b, h, w), aux

    def _decode(self, zq: torch.Tensor) -> torch.Tensor:
        """zq (B, D, h, w) -> images (B, 3, H, W)."""
        if self.post_quant_conv is not None:
            zq = self.post_quant_conv(zq)  # (B, C, h, w)
        return self.decoder(zq)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> codes (B, h, w) int64 in [0, codebook_size).

        Deterministic (nearest code / rounding) and never moves the codebook, in either mode.
        """
        return self._quantize(images, update_codebook=False)[1]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) integers -> images (B, 3, H, W), ~[-1, 1] (not clamped)."""
        if codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"expected integer codes (B, h, w), got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        b, h, w = codes.shape
        zq = self.quantizer.lookup(codes.reshape(b, h * w).long())  # (B, N, D)
        return self._decode(zq.transpose(1, 2).reshape(b, self.code_channels, h, w))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass, the stage-1 autoencoder interface shared with the VAE:
        images (B, 3, H, W) -> (reconstruction (B, 3, H, W), aux).

        aux = ``{"codebook": the quantiser's loss}`` (none for FSQ), added to the
        reconstruction loss with weight 1 by ``AutoencoderLoss`` (the library weights it).
        In train mode the VQ codebook follows the batch by EMA inside this call.
        """
        zq, codes, aux = self._quantize(images)
        if self.training:
            self.code_counts += torch.bincount(codes.flatten(), minlength=self.codebook_size)
        return self._decode(zq), aux

    def pop_code_stats(self) -> dict[str, float]:
        """Usage and perplexity of the codes chosen by training passes since the last call
        (:func:`codebook_stats`), then start a new window. ``{}`` when none were chosen."""
        stats = codebook_stats(self.code_counts)
        self.code_counts.zero_()
        return stats

    # ---- files -------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "autoencoder": self.autoencoder_config,
            "quantizer": self.quantizer_config,
            "codebook_size": self.codebook_size,
            "downsample_factor": self.downsample_factor,
            "info": self.info,
        }

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VQTokenizer:
        """Load a folder written by :meth:`save_pretrained`, in eval mode; offline."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise TokenizerLoadError(f"{path}: no such tokenizer folder")
        cfg_path = path / CONFIG_NAME
        raw = read_json(cfg_path)
        if raw.get("kind") != KIND:
            raise TokenizerLoadError(f"{cfg_path}: not a fusion VQ-GAN artifact (expected "
                                     f"\"kind\": \"{KIND}\", found {raw.get('kind')!r})")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise TokenizerLoadError(f"{cfg_path}: format_version {raw['format_version']} is "
                                     f"newer than this fusion reads ({FORMAT_VERSION})")
        for key in ("autoencoder", "quantizer"):
            if not isinstance(raw.get(key), dict):
                raise TokenizerLoadError(f"{cfg_path}: missing or malformed required key "
                                         f"{key!r}")
        try:
            tok = cls(raw["autoencoder"], raw["quantizer"], raw.get("info"))
        except (TypeError, ValueError, AssertionError, KeyError) as err:
            # the quantiser libraries check their arguments with asserts
            raise TokenizerLoadError(f"{cfg_path}: bad model config: {err}") from err
        load_weights(tok, path / WEIGHTS_NAME)
        if tok.info.get("decoder") == "untrained":  # converted from an encoder-only checkpoint
            log.warning("%s: this VQ-GAN's decoder is untrained (converted without one, "
                        "docs/pretrained.md); images it decodes are noise", path)
        return tok.eval()


def _plain(node) -> dict:
    """A config node (typed DictConfig, dataclass or dict) as a plain dict."""
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    if isinstance(node, dict):
        return dict(node)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def build_vqgan_tokenizer(cfg) -> VQTokenizer:
    """A ``VQGANTokenizerConfig`` -> a fresh :class:`VQTokenizer`."""
    q = _plain(cfg.quantizer)
    kind = q["kind"]
    if kind not in QUANTIZERS:
        raise ValueError(f"tokenizer.quantizer.kind={kind!r}; expected one of {QUANTIZERS}")
    return VQTokenizer(_plain(cfg.autoencoder), {"kind": kind, **q[kind]})


# --------------------------------------------------------------------------------------------
# Held-out figures
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_codes(tokenizer: VQTokenizer, source: Sequence, n: int | None = None,
                   batch_size: int = 64) -> dict:
    """Codebook usage and perplexity of the codes of ``source[:n]`` (``source[i].image``:
    uint8 (H, W, 3)), in eval mode: ``{"codebook_usage", "codebook_perplexity",
    "codes_per_image", "codebook_size"}``."""
    from fusion.data.images import source_batches, to_tensor

    device = next(tokenizer.parameters()).device
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long, device=device)
    per_image = 0
    with eval_mode(tokenizer):
        for batch in source_batches(source, n, batch_size, "evaluate_codes"):
            codes = tokenizer.encode(torch.stack([to_tensor(img) for img in batch]).to(device))
            counts += torch.bincount(codes.flatten(), minlength=tokenizer.codebook_size)
            per_image = math.prod(codes.shape[1:])
    return {**codebook_stats(counts.cpu()), "codes_per_image": per_image,
            "codebook_size": tokenizer.codebook_size}
