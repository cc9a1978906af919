"""Typed config schemas of the model families (light: no torch import, so Hydra can
register them before anything heavy loads). See fusion/config.py for the mechanism."""

from __future__ import annotations

from dataclasses import dataclass, field

OBJECTIVES = ("ddpm", "flow")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
EDIT_LOSSES = ("target", "all")  # Chameleon editing documents: which tokens are targets
EDIT_TARGET_CODES = ("encoded", "local")  # Chameleon editing documents: the target's codes


@dataclass
class DiffusionConfig:
    objective: str = "ddpm"  # ddpm (ε-prediction, cosine schedule) | flow (velocity)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers' name for the cosine schedule
    sample_steps: int = 25  # DDIM / Euler steps at inference (the paper uses 250 on GPU)
    # Sampling, like sample_steps: classifier-free guidance only at noise levels t/T in
    # (lo, hi]; the other steps take the conditional prediction alone. Guidance at the
    # highest noise levels mostly pushes the layout (Kynkäänniemi et al. 2024, "Applying
    # guidance in a limited interval", arXiv:2404.07724); here it emptied one-object images
    # (docs/results.md). For flow t/T is the noise share σ; for DDPM the timestep share.
    # null = guidance at every step.
    guidance_interval: list[float] | None = None
    # Training noise levels: uniform in [0, T) (the paper), or logit-normal, t/T =
    # sigmoid(N(logit_mean, logit_std²)), which spends more of the loss on middle noise levels
    # (Esser et al. 2024, SD3, arXiv:2403.03206, sec. 3.1: their best rectified-flow setting).
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TransfusionConfig:
    backbone: str = "tiny"  # preset of fusion.models.transformer
    backbone_overrides: dict = field(default_factory=dict)
    patchifier: str = "linear"  # linear | unet (Transfusion sec. 3.2)
    patch_size: int = 2  # linear: p x p latent pixels per token
    patchifier_args: dict = field(default_factory=dict)  # extra kwargs (e.g. unet channels)
    # Set from the image tokenizer at build time (fusion.families); give them only to
    # build a model without one.
    latent_channels: int | None = None
    latent_size: int | None = None
    tie_embeddings: bool = False


@dataclass
class TransfusionLossConfig:
    diffusion_weight: float = 5.0  # λ in L = L_LM + λ·L_diffusion (paper sec. 4.1)
    caption_dropout: float = 0.1  # drop the caption of caption->image docs, for CFG
    # Image->caption documents: on this share, noise is limited to t < 500 so the caption is
    # learned from a mostly clean image (paper sec. 4.1: 20 %).
    clean_image_share: float = 0.2
    clean_image_max_t: int = 500
    z_loss_weight: float = 0.0  # Chameleon's z-loss on the LM logits; off by default here
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # Editing documents (source image, instruction, target image; docs/editing.md). The source
    # always enters clean (t = 0) and is never scored; the target is diffused.
    instruction_loss: bool = False  # also train next-token prediction of the instruction
    # InstructPix2Pix condition dropout (arXiv:2211.09800, sec. 3.4): this share each of
    # no-instruction, no-source and neither, for two-scale guidance at sampling time.
    edit_condition_dropout: float = 0.05
    # Training rows: documents are packed into rows of this many positions (null = the
    # backbone's max_seq_len). Attention never crosses documents, so the loss is the same for
    # any row length that fits the longest document; short rows only skip the masked-out
    # cross-document attention. transfusion_tiny packs ShapesWorld's <= 35-position captioned
    # images two to a row of 64: 11–19 % faster CPU steps than rows of 256 (docs/performance.md).
    pack_len: int | None = None


@dataclass
class TransfusionModelConfig:
    """The ``model`` config group for this family (conf/model/transfusion_*.yaml)."""

    family: str = "transfusion"
    arch: TransfusionConfig = field(default_factory=TransfusionConfig)
    loss: TransfusionLossConfig = field(default_factory=TransfusionLossConfig)


@dataclass
class ChameleonConfig:
    backbone: str = "tiny"  # preset of fusion.models.transformer; QK-norm is on (sec. 2.3)
    backbone_overrides: dict = field(default_factory=dict)
    # Add a learned 2-D (row + column) embedding of its grid cell to every image code
    # (fusion.models.chameleon; off = Chameleon's paper setup, 1-D RoPE positions only).
    image_pos_embed: bool = False
    # Editing: add a learned projection (zero at the start) of the source image's code at the
    # cell each target position predicts (fusion.models.chameleon.source_alignment), so that
    # copying an unchanged cell is a local step instead of a search through the sequence.
    # No weight of a text->image model depends on it, so such a model starts a fine-tune.
    source_alignment: bool = False
    # Editing, with source_alignment: a pointer-generator output (See et al. 2017, "Get To The
    # Point", arXiv:1704.04368). Each target position's distribution is
    # g·onehot(aligned source code) + (1 - g)·softmax(logits), g = sigmoid(learned linear of
    # the hidden state), so an unchanged cell is copied exactly and the logits only model the
    # changed cells (fusion.models.chameleon; docs/editing.md, "Copying the source").
    source_copy: bool = False
    # The FSQ levels of the image tokenizer's quantizer (e.g. [8, 5, 5, 5]), or None: adds a
    # factorised term to every image code's logit, the sum of one learned score per FSQ digit
    # of the code (fusion.models.chameleon.code_digits; docs/editing.md, "Code digits"), so
    # what is learnt about one code's digits carries over to every code that shares them. It
    # starts at zero, so a model without it starts a fine-tune unchanged.
    code_digit_levels: list[int] | None = None


@dataclass
class ChameleonLossConfig:
    cm3: bool = True  # false: plain next-token training
    cm3_rate: float = 0.5  # share of documents that get CM3 span masking
    cm3_lambda: float = 1.0  # spans per document ~ Poisson(λ) (metaseq's default)
    caption_dropout: float = 0.1  # for classifier-free guidance
    z_loss_weight: float = 1.0e-5  # Chameleon sec. 2.3
    # Editing documents (docs/editing.md): "target" = only the target image span
    # (<boi> codes <eoi>) is predicted, the source codes and instruction are context; "all" =
    # every token of the document. Editing documents never get CM3 (it would move the source
    # or target span out of place).
    edit_loss: str = "target"
    # The target image's codes: "encoded" = the VQ-GAN's codes of the target; "local" = those
    # codes only in cells within one cell of a changed pixel, the source's codes everywhere
    # else (fusion.models.chameleon.local_edit_codes; docs/editing.md).
    edit_target_codes: str = "encoded"
    edit_condition_dropout: float = 0.05  # as TransfusionLossConfig.edit_condition_dropout
    pack_len: int | None = None  # as TransfusionLossConfig.pack_len


@dataclass
class ChameleonModelConfig:
    """The ``model`` config group for this family (conf/model/chameleon_*.yaml)."""

    family: str = "chameleon"
    arch: ChameleonConfig = field(default_factory=ChameleonConfig)
    loss: ChameleonLossConfig = field(default_factory=ChameleonLossConfig)
