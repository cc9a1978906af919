"""Turn the typed trainer / logger / callback configs into Lightning objects.

Scripts stay straight lines (DESIGN.md, principle 8): they call these builders and never
configure Lightning by hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fusion.config import CallbacksConfig, LoggerConfig, TrainerConfig

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(
        vars(cfg))


def build_logger(cfg: LoggerConfig | DictConfig, save_dir: str | Path):
    """A Lightning logger, or ``False`` for none.

    wandb is forced to the configured mode through both the constructor and ``WANDB_MODE``, and
    its console output is silenced, so an offline run never prompts for an account.
    """
    kind = cfg.kind
    if kind not in LOGGER_KINDS:
        raise ValueError(f"unknown logger kind {kind!r}; expected one of {LOGGER_KINDS}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name="csv", version="")
    if cfg.mode not in WANDB_MODES:
        raise ValueError(f"unknown wandb mode {cfg.mode!r}; expected one of {WANDB_MODES}")
    os.environ["WANDB_MODE"] = cfg.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project=cfg.project, name=cfg.name, save_dir=str(save_dir),
                         offline=cfg.mode == "offline", mode=cfg.mode, tags=list(cfg.tags))
    # Lightning (2.6) always passes `anonymous=None` to wandb.init and wandb (0.2x) warns that
    # the setting has no effect on every run; the run is created lazily from this dict, so
    # dropping the no-op key keeps the output clean without changing anything else.
    init_kwargs = getattr(logger, "_wandb_init", None)
    if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous") is None:
        init_kwargs.pop("anonymous", None)
    return logger


def build_callbacks(cfg: CallbacksConfig | DictConfig, checkpoint_dir: str | Path,
                    extra: list | None = None) -> list:
    from lightning.pytorch.callbacks import (
        LearningRateMonitor,
        ModelCheckpoint,
        RichProgressBar,
        TQDMProgressBar,
    )

    callbacks = [ModelCheckpoint(dirpath=str(checkpoint_dir), filename="step{step:07d}",
                                 auto_insert_metric_name=False, save_last=True,
                                 every_n_train_steps=cfg.checkpoint_every_n_steps,
                                 save_top_k=cfg.keep_last_checkpoints, monitor="step",
                                 mode="max")]
    if cfg.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    elif cfg.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    elif cfg.progress_bar != "none":
        raise ValueError(f"unknown progress_bar {cfg.progress_bar!r}; expected tqdm|rich|none")
    return callbacks + list(extra or [])


def native_bf16(accelerator: str) -> bool:
    """Whether ``accelerator`` runs bf16 matmuls in hardware: a CUDA device with bf16, or a CPU
    with AVX-512 BF16 or AMX. Elsewhere (e.g. an AVX2-only CPU) oneDNN emulates bf16, and a
    bf16-autocast training step runs many times slower than in float32
    (docs/performance.md, "bf16 only where the hardware has it")."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: oneDNN's own answer
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision, accelerator: str = "cpu"):
    """``trainer.precision`` for Lightning. ``auto`` = ``bf16-mixed`` where the hardware runs
    bf16 natively (:func:`native_bf16`), else ``32-true``. An explicit bf16 precision on a CPU
    without it is kept, with a warning, since it is the user's choice."""
    bf16 = native_bf16(accelerator)
    if precision == "auto":
        return "bf16-mixed" if bf16 else "32-true"
    if str(precision).startswith("bf16") and not bf16 and accelerator in ("cpu", "auto"):
        log.warning("trainer.precision=%s on a CPU without native bf16 (no AVX-512 BF16 or "
                    "AMX): autocast emulates it and runs many times slower than 32-true; "
                    "trainer.precision=auto picks the faster one", precision)
    return precision


def build_trainer(cfg: TrainerConfig | DictConfig, logger, callbacks: list,
                  default_root_dir: str | Path):
    """A Lightning Trainer; ``logger`` is :func:`build_logger`'s result (``False``: none)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    if not logger and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        # Lightning's LearningRateMonitor raises at fit start without a logger to write to.
        log.info("no logger (logger=none): the learning-rate monitor is left out")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    kwargs = _plain(cfg)
    kwargs["precision"] = resolve_precision(kwargs["precision"], kwargs["accelerator"])
    strategy = kwargs.pop("strategy")
    if isinstance(strategy, dict):  # e.g. {_target_: lightning.pytorch.strategies.FSDPStrategy}
        strategy = instantiate(strategy)
    progress = any(type(c).__name__.endswith("ProgressBar") for c in callbacks)
    kwargs["enable_progress_bar"] = kwargs["enable_progress_bar"] and progress
    return L.Trainer(strategy=strategy, logger=logger, callbacks=callbacks,
                     default_root_dir=str(default_root_dir), **kwargs)


# Known, harmless messages from the libraries (checked against lightning 2.6 / torch 2.13);
# silenced so that a run's output shows only what matters.
KNOWN_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # lightning's pytree vs torch 2.13
    r".*overridden `transfer_batch_to_device` in `LightningModule` but have passed in a"
    r" `LightningDataModule`.*",  # intended: batches are lists of Documents
    r".*does not have many workers which may be a bottleneck.*",  # ShapesWorld renders fast
    r".*attention_head_dim.*",  # diffusers' get_down_block default notice
)


def quiet_known_warnings() -> None:
    import warnings

    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("diffusers.models.unets.unet_2d_blocks").setLevel(logging.ERROR)
