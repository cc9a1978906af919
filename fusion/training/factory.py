"""Turn the typed trainer / logger / callback configs into Lightning objects.

Scripts stay straight lines (docs/design.md, Principles): they call these builders and never
configure Lightning by hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fusion.config import CallbacksConfig, LoggerConfig, TrainerConfig
from fusion.distributed import is_first_process
from fusion.errors import UserError
from fusion.training.sharding import SHARDED, sharded_strategy

log = logging.getLogger(__name__)

LOGGER_KINDS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(
        vars(cfg))


def _resume_csv(logger, resume_step: int) -> None:
    """Keep a resumed run's CSV log: the rows before the checkpoint's step (the resumed run
    logs the later ones again) go back into ``metrics.csv``, which Lightning's writer deletes
    when it opens, and the new rows are appended after them. A checkpoint at global step k
    follows the batch logged as step k - 1."""
    import csv

    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file() or not is_first_process():  # one writer (DDP: rank 0 logs)
        return
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = list(reader.fieldnames or []), list(reader)
    kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) < resume_step]
    import warnings

    with warnings.catch_warnings():  # "previous log files will be deleted": they are restored
        warnings.simplefilter("ignore")
        writer = logger.experiment  # created now: it deletes metrics.csv
    with path.open("w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=header)
        out.writeheader()
        out.writerows(kept)
    writer.metrics_keys = sorted(header)
    log.info("resuming the CSV log %s: kept %d of %d rows (before step %d)", path, len(kept),
             len(rows), resume_step)


def wandb_run_id(save_dir: Path, resume: bool) -> str:
    """The wandb run id of the run in ``save_dir``: the stored one when ``resume`` (a resumed
    run appends to the same wandb run), else a new one, stored for a later resume."""
    import secrets

    path = save_dir / "wandb" / "run_id"
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    if not is_first_process():  # rank 0 owns the wandb run; the others log nothing
        return "rank-not-logging"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def build_logger(cfg: LoggerConfig | DictConfig, save_dir: str | Path,
                 resume_step: int | None = None):
    """A Lightning logger, or ``False`` for none. ``resume_step``: the run resumes from a
    checkpoint at that step, and its log continues the earlier one (CSV rows after the step
    are dropped, since the resumed run logs them again; wandb resumes the same run id).

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

        # Written at every log step, so a killed run loses no row before its checkpoint.
        logger = CSVLogger(save_dir=str(save_dir), name="csv", version="",
                           flush_logs_every_n_steps=1)
        if resume_step is not None:
            _resume_csv(logger, resume_step)
        return logger
    if cfg.mode not in WANDB_MODES:
        raise ValueError(f"unknown wandb mode {cfg.mode!r}; expected one of {WANDB_MODES}")
    os.environ["WANDB_MODE"] = cfg.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project=cfg.project, name=cfg.name, save_dir=str(save_dir),
                         offline=cfg.mode == "offline", mode=cfg.mode, tags=list(cfg.tags),
                         id=wandb_run_id(save_dir, resume_step is not None),
                         resume="allow")
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
        RichProgressBar,
        TQDMProgressBar,
    )

    from fusion.training.callbacks import DataPosition, StepTimer
    from fusion.training.checkpointing import FusionCheckpoint

    callbacks = [FusionCheckpoint(checkpoint_dir, cfg.checkpoint_every_n_steps,
                                  cfg.checkpoint_every_minutes, cfg.keep_last_checkpoints),
                 DataPosition(), StepTimer()]
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


def check_sharded_setup(accelerator: str, precision) -> None:
    """``trainer.strategy=fsdp`` runs on CUDA GPUs (NCCL) and on CPUs (gloo) only, in float32
    or bf16: FSDP2 has no fp16 loss scaling in Lightning's ModelParallelStrategy."""
    if accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise UserError(f"trainer.strategy=fsdp runs on CUDA GPUs or the CPU; "
                        f"trainer.accelerator={accelerator} cannot shard (use gpu or cpu)")
    if str(precision).startswith("16"):
        raise UserError(f"trainer.strategy=fsdp takes precision 32-true or bf16-mixed, not "
                        f"{precision} (fp16 needs a loss scaler that FSDP2 in Lightning lacks)")


def build_trainer(cfg: TrainerConfig | DictConfig, logger, callbacks: list,
                  default_root_dir: str | Path, splits_data_itself: bool = False):
    """A Lightning Trainer; ``logger`` is :func:`build_logger`'s result (``False``: none).
    ``splits_data_itself``: the datamodule gives every rank its own share of the data
    (fusion.data.datamodule.ResumableSampler), so Lightning does not wrap its samplers in a
    ``DistributedSampler``; otherwise Lightning splits shuffled loaders over the ranks."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    if not logger and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        # Lightning's LearningRateMonitor raises at fit start without a logger to write to.
        log.info("no logger (logger=none): the learning-rate monitor is left out")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    kwargs = _plain(cfg)
    kwargs.pop("activation_checkpointing", None)  # the module's (FusionModule), not Lightning's
    kwargs["precision"] = resolve_precision(kwargs["precision"], kwargs["accelerator"])
    strategy = kwargs.pop("strategy")
    if isinstance(strategy, dict):  # e.g. {_target_: lightning.pytorch.strategies.FSDPStrategy}
        strategy = instantiate(strategy)
    elif strategy == SHARDED:
        check_sharded_setup(kwargs["accelerator"], kwargs["precision"])
        strategy = sharded_strategy(kwargs["devices"], kwargs.get("num_nodes", 1))
    progress = any(type(c).__name__.endswith("ProgressBar") for c in callbacks)
    kwargs["enable_progress_bar"] = kwargs["enable_progress_bar"] and progress
    from fusion.training.checkpointing import AtomicCheckpointIO

    return L.Trainer(strategy=strategy, logger=logger, callbacks=callbacks,
                     default_root_dir=str(default_root_dir), plugins=[AtomicCheckpointIO()],
                     use_distributed_sampler=not splits_data_itself, **kwargs)


# Known, harmless messages from the libraries (checked against lightning 2.6 / torch 2.13);
# silenced so that a run's output shows only what matters.
KNOWN_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # lightning's pytree vs torch 2.13
    r".*overridden `transfer_batch_to_device` in `LightningModule` but have passed in a"
    r" `LightningDataModule`.*",  # intended: batches are lists of Documents
    r".*does not have many workers which may be a bottleneck.*",  # ShapesWorld renders fast
    r".*attention_head_dim.*",  # diffusers' get_down_block default notice
    # fusion resumes the data order itself (training.callbacks.DataPosition), which Lightning
    # cannot see: its warning that a mid-epoch resume replays the loader does not apply.
    r".*resuming from a checkpoint that ended before the epoch ended and your dataloader.*",
)


def quiet_known_warnings() -> None:
    import warnings

    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("diffusers.models.unets.unet_2d_blocks").setLevel(logging.ERROR)
