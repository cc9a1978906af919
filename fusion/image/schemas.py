"""Typed config schemas of the ``tokenizer`` group (no torch import: composed before training).

A tokenizer YAML opts into its schema with ``defaults: [vae_schema, _self_]``; the schema is
registered in :data:`fusion.config.GROUP_SCHEMAS`, so a misspelt key fails at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion.config import AdamWConfig


@dataclass
class AutoencoderKLConfig:
    """Arguments of diffusers ``AutoencoderKL`` (a fresh one, trained by us).

    ``len(block_out_channels)`` levels give a downsampling factor of ``2 ** (levels - 1)``:
    four levels -> f8, as in Stable Diffusion's VAE (Rombach et al. 2022, arXiv:2112.10752).
    """

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    init_posterior_logvar: float | None = None  # e.g. -8: start with a near-deterministic q(z|x)


@dataclass
class AutoencoderLossConfig:
    """Stage-1 loss (fusion.image.losses.AutoencoderLoss); shared by the VAE and the VQ-GAN.

    Defaults are the reconstruction-only setting: L1 + L2 with a tiny KL (Rombach et al.
    2022 use 1e-6) and no GAN, which is what PSNR rewards. Set ``disc_weight > 0`` for the
    PatchGAN hinge loss (Esser et al. 2021, arXiv:2012.09841) from ``disc_start`` on.
    """

    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1.0e-6
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None  # local LPIPS/VGG weights; never downloaded
    disc_weight: float = 0.0  # 0: no discriminator is built
    disc_start: int = 0  # the adversarial term is off before this step (taming: 'disc_start')
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr_scale: float = 1.0
    adaptive_weight_max: float = 1.0e4  # taming clamps the adaptive weight to [0, 1e4]


@dataclass
class TokenizerOptimConfig(AdamWConfig):
    """Stage 1 (fusion.training.tokenizer_module): the shared AdamW + cosine schema with the
    autoencoders' defaults (no weight decay, beta2 0.99, cosine to 5 %), plus clipping."""

    weight_decay: float = 0.0
    beta2: float = 0.99
    min_lr_ratio: float = 0.05
    grad_clip: float | None = 1.0  # manual optimisation: the module clips, not the Trainer


@dataclass
class VAETokenizerConfig:
    """``tokenizer=vae_*``: a continuous image tokenizer for the Transfusion family.

    Either trains a fresh ``AutoencoderKL`` (``pretrained: null``) or wraps a pretrained one
    from a local folder / single file (``pretrained: /path``; ``pretrained_config`` for a
    single ``.safetensors`` file). The latent scale and shift are measured on
    ``scaling_images`` training images, never assumed.
    """

    name: str = "vae"
    kind: str = "vae"
    pretrained: str | None = None
    pretrained_config: str | None = None  # config.json (or its folder) for a single-file VAE
    sample_posterior: bool = True  # training: z ~ q(z|x) (the VAE); encode() uses the mean
    # Train on random crops of this size (a multiple of f; null: whole images). The network is
    # convolutional, so a crop teaches the same local encoding/decoding for a fraction of the
    # compute (LDM's autoencoders train on 256-px crops and run at 512+); held-out metrics are
    # always on whole images.
    train_crop: int | None = None
    scaling_images: int = 512  # images used to measure the latent shift / scale
    eval_images: int = 512  # held-out images for the artifact's card (PSNR, attributes)
    image_log_every: int = 500  # reconstruction grid every N steps (0: never)
    artifact_dir: str = "tokenizers/${tokenizer.name}"
    overwrite: bool = False  # refuse to replace an existing artifact unless asked
    autoencoder: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)


# --------------------------------------------------------------------------------------------
# VQ-GAN (discrete codes for the Chameleon family): fusion.image.vqgan
# --------------------------------------------------------------------------------------------
@dataclass
class VQAutoencoderConfig:
    """The VQ-GAN's convolutional encoder/decoder: diffusers' ``Encoder``/``Decoder`` (the
    taming/LDM ResNet stacks, attention at the lowest resolution in the mid block).

    ``len(block_out_channels)`` levels -> f = 2 ** (levels - 1): four levels give f8
    (64 px -> 8×8 codes), five give f16 as in VQGAN (Esser et al. 2021, arXiv:2012.09841).
    ``latent_channels`` is the width of the feature that is quantised (the quantizer projects
    it down to its own code dimension when they differ).
    """

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    latent_channels: int = 32
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    # "group": diffusers' GroupNorm; "batch": the encoder's norms become batch norms
    # (fusion.image.vqgan.RunningNorm), fixed statistics when encoding. With "batch" and no
    # mid-block attention nothing in the encoder spans the image, so editing a region leaves
    # the codes far from it unchanged (docs/tokenizers.md, "Local codes";
    # conf/tokenizer/vqgan_local.yaml).
    norm: str = "group"


@dataclass
class VQConfig:
    """``quantizer.kind=vq``: vector-quantize-pytorch ``VectorQuantize``, LlamaGen-style
    (Sun et al. 2024, arXiv:2406.06525): low-dimensional (``codebook_dim``), l2-normalised
    (cosine-similarity) codes. The codebook follows the encoder by EMA (``decay``) rather than
    by a codebook loss, and codes whose EMA usage falls below ``threshold_ema_dead_code`` are
    re-seeded from the batch (dead-code expiry), which keeps usage high."""

    codebook_size: int = 1024
    codebook_dim: int = 8
    use_cosine_sim: bool = True
    decay: float = 0.99
    commitment_weight: float = 0.25  # β of the VQ-VAE commitment term (LlamaGen: 0.25)
    threshold_ema_dead_code: float = 2.0
    kmeans_init: bool = False
    rotation_trick: bool = True  # gradients through the quantiser by rotation (arXiv:2410.06424)


@dataclass
class FSQConfig:
    """``quantizer.kind=fsq``: finite scalar quantisation (Mentzer et al. 2023,
    arXiv:2309.15505): each of ``len(levels)`` dims is bounded and rounded to ``levels[i]``
    values; the codebook is implicit, of size ``prod(levels)`` (paper's [8, 5, 5, 5] = 1000),
    with no auxiliary loss and no codebook to collapse."""

    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])


@dataclass
class LFQConfig:
    """``quantizer.kind=lfq``: lookup-free quantisation (MAGVIT-v2, Yu et al. 2023,
    arXiv:2310.05737): log2(codebook_size) dims, each quantised to ±1; an entropy penalty
    (low per-sample entropy, high batch entropy) spreads usage over the codebook."""

    codebook_size: int = 1024  # a power of 2
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 0.25
    diversity_gamma: float = 1.0


@dataclass
class QuantizerConfig:
    """Which quantizer (``kind``: vq | fsq | lfq) and the arguments of each; only the block
    named by ``kind`` is used."""

    kind: str = "fsq"
    vq: VQConfig = field(default_factory=VQConfig)
    fsq: FSQConfig = field(default_factory=FSQConfig)
    lfq: LFQConfig = field(default_factory=LFQConfig)


@dataclass
class VQGANTokenizerConfig:
    """``tokenizer=vqgan_*``: a discrete image tokenizer (VQ-GAN, Esser et al. 2021,
    arXiv:2012.09841) for the Chameleon family: images -> (h, w) integer codes."""

    name: str = "vqgan"
    kind: str = "vqgan"
    # Train on random crops of this size (a multiple of f, on the code grid; null: whole
    # images), as the VAE does: the network is convolutional, so a crop teaches the same local
    # coding for a fraction of the compute; held-out figures are always on whole images.
    train_crop: int | None = None
    eval_images: int = 512  # held-out images for the artifact's card (PSNR, usage, attributes)
    image_log_every: int = 500  # reconstruction grid every N steps (0: never)
    artifact_dir: str = "tokenizers/${tokenizer.name}"
    overwrite: bool = False  # refuse to replace an existing artifact unless asked
    autoencoder: VQAutoencoderConfig = field(default_factory=VQAutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
