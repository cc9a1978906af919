"""Typed configuration schemas behind the YAML in ``conf/``.

Each entry point's top-level config is a dataclass registered in Hydra's ConfigStore; its
fields are the config groups (``data``, ``trainer``, ``logger``, ...), each a dataclass too.
Hydra merges the YAML files into these typed nodes, so an unknown or misspelt key -- in a YAML
file, an experiment or a command-line override -- fails at compose time with a message that
names the key (``Key 'max_stpes' not in 'TrainerConfig'``), instead of being silently ignored
an hour into a run.

Group YAML files hold values only; the schemas here hold names, types and defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fusion.errors import UserError

# The repository's conf/ folder; scripts and tests compose from it.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class DataConfig:
    """Where documents come from and how they are batched."""

    source: str = "shapes"  # shapes | folder | shards
    # caption: (image, caption) documents, both orders; edit: (source image, instruction,
    # target image) documents -- ShapesWorld edits, or a folder's edits.jsonl (docs/editing.md)
    # story: interleaved ShapesWorld documents, a scene and edits of it in a row, text and
    # images alternating (fusion.data.shapes.story_texts; docs/interleaved.md)
    documents: str = "caption"
    root: str | None = None  # folder source: images + captions.jsonl
    val_root: str | None = None  # folder source: held-out folder (default: last val_share)
    val_share: float = 0.05
    # shards source (fusion.data.shards; docs/data.md): tar shards as a list, a glob or a
    # brace pattern; held out: val_shards (default: the last shard of `shards`)
    shards: Any = None
    val_shards: Any = None
    caption_key: str = "txt"  # txt (the .txt member) or json.<field> (a field of the .json)
    shards_per_block: int = 1  # shuffle buffer: the samples of this many shards
    image_size: int = 64
    resize: str = "center_crop"  # center_crop | resize | pad (fusion.data.images.fit)
    max_bad_share: float = 0.1  # refuse a folder when more records than this are bad
    # A record whose text does not fit the family's row (caption + image positions + special
    # tokens) is skipped and counted when the data opens; true: cut the text to fit instead.
    truncate_captions: bool = False
    seed: int = 0
    num_train: int = 20000  # shapes source: scenes 0 .. num_train-1 train ...
    num_val: int = 512  # ... and the next num_val are held out
    caption_tags: list[str] | None = None  # shapes source: which caption kinds to draw
    edit_kinds: list[str] | None = None  # shapes edits: recolor/move/add/remove; null = all
    story_images: list[int] = field(default_factory=lambda: [2, 3])  # images per story, cycled
    image_first_ratio: float = 0.2  # Transfusion's 80/20 caption->image / image->caption
    batch_size: int = 32
    num_workers: int = 0
    # batches each loader worker keeps ready (torch's prefetch_factor; needs num_workers > 0)
    prefetch_factor: int = 2
    # page-locked batches when training on CUDA, so host-to-GPU copies overlap the step
    pin_memory: bool = True
    text_tokenizer: str = "tokenizers/shapes-bpe/tokenizer.json"


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer``; see its docs for each."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    # a Lightning strategy name ("ddp", ...), "fsdp" (FSDP2, fusion.training.sharding), or a
    # node with _target_ (any Lightning strategy class)
    strategy: Any = "auto"
    # Lightning's precision, or "auto": bf16-mixed where the hardware runs bf16 natively,
    # else 32-true (fusion.training.factory.resolve_precision).
    precision: Any = "32-true"
    max_steps: int = -1
    max_epochs: int | None = None
    max_time: str | None = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: Any = None
    log_every_n_steps: int = 50
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = False
    # fusion's own, not a Trainer argument: recompute each transformer block's activations in
    # the backward pass (fusion.training.sharding.checkpoint_blocks); any strategy.
    activation_checkpointing: bool = False


@dataclass
class LoggerConfig:
    """Experiment logger. wandb runs offline unless ``mode=online`` is asked for explicitly."""

    kind: str = "wandb"  # wandb | csv | none
    project: str = "fusion"
    name: str | None = None
    mode: str = "offline"  # wandb only: offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class CallbacksConfig:
    # Checkpoints (fusion.training.checkpointing): every N steps and every M minutes of
    # training (0 turns either off), at the end, and on SIGTERM/SIGINT; the newest
    # keep_last_checkpoints numbered ones are kept, plus last.ckpt.
    checkpoint_every_n_steps: int = 500
    checkpoint_every_minutes: float = 10.0
    keep_last_checkpoints: int = 1
    lr_monitor: bool = True
    progress_bar: str = "tqdm"  # tqdm | rich | none


@dataclass
class TextTokenizerTrainConfig:
    """Training the byte-level BPE on ShapesWorld text (fusion.data.text)."""

    vocab_size: int = 512
    min_frequency: int = 2
    num_scenes: int = 20000


@dataclass
class DemoSettings:
    grid_images: int = 32
    grid_columns: int = 8
    detector_check_scenes: int = 500
    # Stage 1: the family's image tokenizer artifact. It is reused when present (the shipped
    # ones are); otherwise it is trained with scripts/train_tokenizer.py and these overrides.
    image_tokenizer: str | None = None  # default: tokenizers/shapes-vae | shapes-vqgan
    tokenizer_overrides: list[str] = field(default_factory=list)
    # Stage 2: scripts/train.py experiment=<family>_tiny with these overrides.
    train_steps: int = 3000
    train_overrides: list[str] = field(default_factory=list)
    # Stage 3: evaluation size (fusion.eval.model.ModelEvalConfig).
    eval_images_per_tag: int = 100  # single_object + colors: 200 single-object prompts
    eval_caption_images: int = 200
    # Sampling (guidance, diffusion steps, temperature, top-k) is the trained model's recorded
    # recipe (config.json "sampling"); change it with train_overrides, e.g.
    # '[sampling.guidance_scale=3]'.
    # Stage 4: an image-editing fine-tune of the stage-2 model
    # (scripts/train.py experiment=edit_<family>_tiny init_from=...), then edits of
    # edit_per_kind held-out scenes per kind, scored. Off (0 steps) by default: a fine-tune
    # short enough for the main job's time budget edits nothing right (docs/results.md, "The
    # main job"); demo.edit_steps=N turns it on (the recipe's figures took ~10,000 steps).
    edit_steps: int = 0
    edit_per_kind: int = 16
    edit_overrides: list[str] = field(default_factory=list)
    # Processes per stage (docs/scaling.md): > 1 trains with DDP over that many devices of
    # trainer.accelerator and evaluates under torchrun with the batches split between them.
    processes: int = 1


@dataclass
class DemoConfig:
    """``scripts/demo.py``: the README's main command."""

    seed: int = 0
    output_dir: str = "outputs/demo"
    family: str = "transfusion"  # transfusion | chameleon
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    text_tokenizer: TextTokenizerTrainConfig = field(default_factory=TextTokenizerTrainConfig)
    demo: DemoSettings = field(default_factory=DemoSettings)


@dataclass
class AdamWConfig:
    """AdamW + linear warm-up + cosine decay: the optimiser of both training stages. Each
    stage's schema extends it with what only that stage uses, and its own defaults
    (:class:`OptimConfig` here; fusion.image.schemas.TokenizerOptimConfig for stage 1)."""

    lr: float = 1e-3
    # Stage 2 decays only linear and convolution weights: not norms, biases or embeddings
    # (fusion.training.fusion_module.weight_decay_groups).
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps
    # Wall-clock budget (s): the cosine reaches its end at whichever comes first,
    # trainer.max_steps or this, and training stops there (fusion_module.CosineClock). null:
    # steps only (a reproducible step count; with a budget it depends on the machine's load).
    time_budget_s: float | None = None


@dataclass
class OptimConfig(AdamWConfig):
    """Stage 2 (fusion.training.fusion_module). Lightning optimises automatically here, so
    gradient clipping is ``trainer.gradient_clip_val``."""

    ema_decay: float | None = None  # e.g. 0.999; None = no EMA
    # Training-compute budget (FLOPs, fusion.models.transformer.training_flops_per_position
    # per packed position): like time_budget_s, the cosine ends at whichever comes first,
    # trainer.max_steps or this, and training stops there; reproducible on any machine.
    # null: steps only. Every run records the FLOPs it trained (config.json "train_flops").
    flops_budget: float | None = None
    # A step whose loss or gradient norm is not finite applies no update; more than this many
    # in a row stop the run with an error (fusion_module.FusionModule.on_before_optimizer_step).
    max_nonfinite_steps: int = 3


@dataclass
class SamplingConfig:
    """Generation settings shared by the sample grids during training and scripts/sample.py."""

    prompts: list[str] = field(default_factory=lambda: [
        "a photo of a red circle", "a photo of a blue square", "a photo of a green triangle",
        "a photo of a yellow star", "a photo of a purple diamond", "a photo of two circles",
        "a photo of a circle left of a square", "a photo of an orange star and a white circle"])
    guidance_scale: float | None = 3.0  # classifier-free guidance; null = unguided
    # Editing only: guidance over the source image (InstructPix2Pix's s_I, 1.5 in their
    # paper); null leaves the no-image stream out. guidance_scale is then over the instruction.
    image_guidance_scale: float | None = 1.5
    diffusion_steps: int = 25  # Transfusion: DDIM/Euler steps (the paper uses 250 on GPU)
    temperature: float = 1.0  # Chameleon image codes; captions are decoded greedily
    top_k: int | None = None
    top_p: float | None = None
    # Transfusion: guide only at noise levels t/T in (lo, hi] (arXiv:2404.07724); null: the
    # interval the model was trained with (model.loss.diffusion.guidance_interval).
    guidance_interval: list[float] | None = None
    grid_every_n_steps: int = 0  # 0 = only at the end of training
    # A prompt longer than the model takes (max_seq_len minus the image/answer positions):
    # "error" refuses it before sampling, naming the prompt; "truncate" keeps its first
    # tokens, with one warning (fusion.sampling.base.fit_prompts).
    prompt_overflow: str = "error"  # error | truncate
    seed: int = 0


@dataclass
class LoraTrainConfig:
    """LoRA adapters on the transformer blocks' projections (fusion.training.lora). rank 0 =
    full fine-tuning. The saved model folder holds the merged weights."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # which projections of every block: attention wq, wk, wv, wo; SwiGLU w1, w2, w3
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2",
                                                        "w3"])
    # parameter-name prefixes trained in full as well (e.g. ["source_proj", "copy_gate"])
    train_also: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """``scripts/train.py``: stage 2, a family model on documents."""

    seed: int = 0
    output_dir: str = "outputs/train/${model.family}"
    image_tokenizer: str = "tokenizers/shapes-vae"  # stage-1 artifact folder
    # Fine-tuning: start from these weights -- a model folder (config.json +
    # model.safetensors) or a Lightning .ckpt -- instead of a random init. It must match this
    # run's family, tokenizers and shapes (fusion.training.init_from).
    init_from: str | None = None
    # Or start the shared transformer and the text embeddings from a local Hugging Face
    # Llama-family folder (config.json + safetensors + tokenizer.json); the image parts start
    # fresh. data.text_tokenizer must be that folder's tokenizer.json (fusion.convert.llama,
    # docs/pretrained.md).
    init_backbone: str | None = None
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    # Host memory (MiB) for the frozen image tokenizer's outputs, memoised per distinct image
    # (fusion.training.encode_cache): images seen again (every epoch) are not re-encoded.
    # 0 = encode every time. A 64x64 ShapesWorld image costs 1 KiB (VAE) or 0.5 KiB (VQ).
    encode_cache_mb: float = 512.0
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # typed by the family's schema (model/<family>_*.yaml)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class SampleConfig:
    """``scripts/sample.py``: generate from a trained model folder (either family)."""

    model_dir: str = "outputs/train/transfusion_tiny/model"
    # text_to_image | image_to_text | text_to_text | interleaved (docs/interleaved.md)
    task: str = "text_to_image"
    # default: sampling.prompts (interleaved: 8 held-out ShapesWorld story prompts)
    prompts: list[str] | None = None
    prompt_file: str | None = None  # one prompt per line, or a GenEval metadata .jsonl
    images: str | None = None  # image_to_text: a folder of images (default: ShapesWorld)
    num_images: int = 8  # image_to_text with ShapesWorld: held-out scenes to caption
    images_per_prompt: int = 1
    batch_size: int = 16
    # text the model may write: 24 tokens for captions and text, 96 for an interleaved document
    max_new_tokens: int | None = None
    max_images: int = 4  # interleaved: images per document at most
    output_dir: str = "outputs/samples"
    device: str = "auto"  # auto | cpu | cuda
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class TrainTokenizerConfig:
    """``scripts/train_tokenizer.py``: stage 1, an image tokenizer (VAE or VQ-GAN)."""

    seed: int = 0
    output_dir: str = "outputs/tokenizers/${tokenizer.name}"
    data: DataConfig = field(default_factory=DataConfig)
    # Typed by the group's own schema (e.g. tokenizer/vae_tiny.yaml -> vae_schema), see below.
    tokenizer: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)


# Schemas of groups whose options differ in shape (a VAE and a VQ-GAN take different keys).
# A group file opts in with `defaults: [<name>, _self_]`. They live in light modules next to
# their package (no torch import) and are registered here: (group, name) -> "module:Class".
GROUP_SCHEMAS: dict[tuple[str, str], str] = {
    ("model", "transfusion_schema"): "fusion.models.schemas:TransfusionModelConfig",
    ("model", "chameleon_schema"): "fusion.models.schemas:ChameleonModelConfig",
    ("tokenizer", "vae_schema"): "fusion.image.schemas:VAETokenizerConfig",
    ("tokenizer", "vqgan_schema"): "fusion.image.schemas:VQGANTokenizerConfig",
}

_registered = False


@dataclass
class TrainTextTokenizerConfig:
    """``scripts/train_text_tokenizer.py``: the byte-level BPE on a data source's texts."""

    out: str = "tokenizers/shapes-bpe"  # folder for tokenizer.json + card.json
    # The most tokens, fusion's special tokens and the 256 bytes included (>= 270); training
    # stops earlier when no pair of tokens occurs min_frequency times any more.
    vocab_size: int = 512
    min_frequency: int = 2
    show_progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class StudyScoring:
    """How every run of a study is scored: the same for all (fusion.study)."""

    world_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # GenEval prompt sets
    images_per_tag: int = 30  # per prompt set; pooled over the sets
    caption_images: int = 100
    text_loss_documents: int = 256  # held-out caption-only documents (fusion.eval.text_loss)
    fid: bool = True


@dataclass
class StudySettings:
    """One compute study (conf/study/<name>.yaml): every family at every budget."""

    name: str = "cpu"
    families: list[str] = field(default_factory=lambda: ["transfusion", "chameleon"])
    # Training compute per run, in FLOPs (optim.flops_budget): a ladder, e.g. a factor of 2
    # apart.
    budgets: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    # Seeds after the first run only at budgets up to this (null: at every budget).
    extra_seeds_up_to: float | None = None
    experiment: str = "{family}_tiny"  # the training recipe of each family
    train_overrides: list[str] = field(default_factory=list)  # for every run
    family_overrides: dict[str, list[str]] = field(default_factory=dict)  # per family
    # An editing-data study: every run fine-tunes init_from[family] on this many distinct
    # ShapesWorld edit triplets (data.num_train) at each budget, and is scored on held-out
    # edits (experiment: "edit_{family}_tiny"). Empty: a compute study.
    edit_triplets: list[int] = field(default_factory=list)
    init_from: dict[str, str] = field(default_factory=dict)  # family -> model folder
    edits_per_kind: int = 100  # editing-data studies: held-out edits of each kind, scored
    debug: str | None = None  # a conf/debug config for every run (seconds-long runs)
    scoring: StudyScoring = field(default_factory=StudyScoring)


@dataclass
class StudyConfig:
    """``scripts/study.py``: the families trained at matched compute and scored alike."""

    output_dir: str = "outputs/study/${study.name}"
    study: StudySettings = field(default_factory=StudySettings)
    text_tokenizer: str = "tokenizers/shapes-bpe/tokenizer.json"
    logger: str = "csv"  # what each run logs with: csv | wandb | none
    accelerator: str = "cpu"
    plots_dir: str | None = None  # where the PNGs go (default: output_dir), e.g. docs/images


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent; call before composing)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="demo_schema", node=DemoConfig)
    cs.store(name="study_schema", node=StudyConfig)
    cs.store(name="train_tokenizer_schema", node=TrainTokenizerConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="train_text_tokenizer_schema", node=TrainTextTokenizerConfig)
    for (group, name), target in GROUP_SCHEMAS.items():
        module, cls = target.split(":")
        cs.store(group=group, name=name, node=getattr(importlib.import_module(module), cls))
    OmegaConf.register_new_resolver("required", required_value, replace=True)
    _registered = True


def required_value(value, name: str):
    """``${required:${init_from},init_from}``: the value, or a clear error naming the key a
    recipe needs (a MISSING ``???`` in an experiment file does not override the schema's
    default, so recipes ask through this resolver)."""
    if value is None or value == "":
        raise UserError(f"this recipe needs {name}=...; set it on the command line")
    return value


class UnknownConfigKeyError(UserError):
    """A config key that no schema declares (a typo, or a key forced in with ``+``)."""


def check_keys(cfg: DictConfig, where: str = "") -> DictConfig:
    """Fail on keys that the typed schema does not declare.

    Hydra already rejects unknown keys from YAML files and plain overrides; this also catches
    keys forced in with ``+key=value``, which Hydra lets through even into a typed node.
    """
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in cfg.keys():
            if key not in known:
                raise UnknownConfigKeyError(
                    f"unknown config key '{where}{key}': {schema.__name__} has no field "
                    f"{key!r} (known: {', '.join(sorted(known))})")
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_keys(node, f"{where}{key}.")
    return cfg


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose (and key-check) a config from ``conf/`` outside ``@hydra.main`` (tests,
    notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return check_keys(hydra_compose(config_name=config_name, overrides=overrides or []))


def given_keys(overrides, group: str = "sampling") -> set[str]:
    """The keys of ``group`` set on a Hydra command line (``HydraConfig.get().overrides.task``):
    what the user chose on purpose, as opposed to defaults."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return {k.removeprefix(f"{group}.") for k in keys if k.startswith(f"{group}.")}


def to_dataclass(node, cls):
    """A config node (typed DictConfig, plain dict, or already ``cls``) as an instance of its
    schema dataclass, nested fields included; unknown keys fail, naming the key."""
    if isinstance(node, cls):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))


def resolve_path(path: str | Path) -> Path:
    """A config path: absolute, relative to the working directory, or else relative to the
    repository root (so shipped artifacts like ``tokenizers/shapes-bpe`` resolve from anywhere).
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_repo = CONF_DIR.parent / p
    return in_repo if in_repo.exists() else p
