"""Checkpoints that survive: written atomically, by steps and by wall time, on SIGTERM/SIGINT,
never from a diverged state, and found again on restart even when the newest one is corrupt.

What is guaranteed, and the tests that pin it, is listed in docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import signal
import zipfile
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fusion.distributed import is_first_process
from fusion.io import replace_atomically

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through :func:`fusion.io.replace_atomically`: a crash or
    a kill mid-write leaves the previous checkpoint whole, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        replace_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


class FusionCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving every ``every_n_steps`` steps *and* every
    ``every_minutes`` of training (0 turns either off), keeping the ``keep_last`` newest
    numbered checkpoints plus ``last.ckpt``.

    It also saves when the run is stopped by SIGTERM (a cluster's pre-emption) or SIGINT
    (Ctrl-C; see :func:`graceful_sigint`), between two steps, and never while the module is in a
    streak of non-finite steps (``nonfinite_streak`` > 0), so the newest checkpoint is always
    one from before a divergence."""

    def __init__(self, dirpath, every_n_steps: int, every_minutes: float, keep_last: int):
        super().__init__(dirpath=str(dirpath), filename="step{step:07d}",
                         auto_insert_metric_name=False, save_last=True,
                         every_n_train_steps=max(0, every_n_steps), save_top_k=keep_last,
                         monitor="step", mode="max", save_on_exception=True)
        # ModelCheckpoint's constructor takes either a step or a time interval; its
        # on_train_batch_end honours both, so the time interval is set after it.
        if every_minutes and every_minutes > 0:
            self._train_time_interval = timedelta(minutes=every_minutes)

    @property
    def state_key(self) -> str:
        return "FusionCheckpoint"

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        streak = getattr(trainer.lightning_module, "nonfinite_streak", 0)
        return super()._should_skip_saving_checkpoint(trainer) or streak > 0

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM stops the loop between two steps, a consistent state to save. Any other
        # exception (a divergence, a bug, a second Ctrl-C) may come mid-step: not saved.
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


class StopSignal:
    """Which signal stopped training (SIGTERM unless :func:`graceful_sigint` saw a Ctrl-C)."""

    def __init__(self) -> None:
        self.signum = signal.SIGTERM

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def graceful_sigint(trainer) -> StopSignal:
    """Make the first Ctrl-C (SIGINT) stop training the way SIGTERM does in Lightning: after
    the current step, with a checkpoint (FusionCheckpoint.on_exception). A second Ctrl-C
    interrupts at once, as usual. Call after the Trainer is built, in the main process."""
    stop = StopSignal()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        log.warning("SIGINT: stopping after this step and saving a checkpoint (Ctrl-C again "
                    "to stop at once)")
        stop.signum = signal.SIGINT
        trainer._signal_connector.received_sigterm = True
        signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    return stop


def checkpoint_step(path: Path) -> int:
    """The global step stored in a checkpoint; raises when the file is unreadable.

    Every member's CRC is checked first (a truncated or bit-flipped file fails here), then the
    checkpoint is opened memory-mapped with ``weights_only=True``, which reads its small
    pickle without copying the tensors. A sharded checkpoint (a folder, written whole by
    fusion.training.sharding.ShardedStrategy) is read from its ``meta.pt``."""
    if path.is_dir():  # a sharded checkpoint (trainer=fsdp): shards, their index, meta.pt
        if not (path / ".metadata").is_file():
            raise ValueError("a sharded checkpoint without its .metadata index")
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        return int(meta["global_step"])
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise ValueError(f"member {bad} fails its CRC check")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt["global_step"])


def find_resume_checkpoint(checkpoint_dir) -> tuple[Path | None, int]:
    """(the newest intact checkpoint in ``checkpoint_dir``, its step), or (None, 0).

    Candidates are ``last.ckpt`` and the numbered ones; the one with the highest step that
    reads back wins. A corrupt one is reported, renamed to ``<name>.corrupt`` (kept for a
    post-mortem, never picked again) and the next is tried."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None, 0
    found = []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            found.append((checkpoint_step(path), path.name == LAST, path))
        except Exception as err:  # zip, pickle and torch raise many types for a broken file
            if not is_first_process():  # every rank skips it; rank 0 sets it aside
                continue
            log.warning("checkpoint %s is unreadable (%s: %s); renamed to %s.corrupt and "
                        "skipped", path, type(err).__name__, err, path.name)
            os.replace(path, path.with_name(path.name + ".corrupt"))  # a file or a folder
    if not found:
        return None, 0
    step, _, path = max(found)  # highest step; last.ckpt wins a tie (it holds the end state)
    return path, step


def fit_resuming(trainer, module, datamodule, checkpoint_dir, resume: Path | None,
                 resume_step: int = 0) -> None:
    """``trainer.fit`` from ``resume`` (:func:`find_resume_checkpoint`'s pick; None: a fresh
    start), reading it with ``weights_only=True``. SIGTERM and the first Ctrl-C stop after the
    step in progress with a checkpoint (:func:`graceful_sigint`, FusionCheckpoint), and the
    process ends with a message saying how to go on. Both training stages start this way."""
    if resume:
        check_resumable(resume, module, checkpoint_dir)
        log.info("resuming from %s (step %d)", resume, resume_step)
    stop_signal = graceful_sigint(trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None,
                    weights_only=True)
    except SIGTERMException:
        raise SystemExit(f"stopped by {stop_signal.name} at step {trainer.global_step}; the "
                         f"checkpoints in {checkpoint_dir} hold it: run the same command "
                         "again to resume") from None


def check_resumable(path: Path, module: torch.nn.Module, checkpoint_dir) -> None:
    """Refuse, before training starts, to resume from a checkpoint of another model (an
    output_dir reused with a changed config): every weight's name and shape must match the
    module's. The checkpoint is read memory-mapped, so its tensors are not loaded. A sharded
    checkpoint (a folder) is checked by its own loader."""
    if Path(path).is_dir():
        return
    from fusion.errors import UserError

    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    mine = module.state_dict()
    differ = [f"{k}: {tuple(saved[k].shape) if k in saved else 'absent'} there, "
              f"{tuple(mine[k].shape) if k in mine else 'absent'} here"
              for k in sorted(set(saved) | set(mine))
              if k not in saved or k not in mine or saved[k].shape != mine[k].shape]
    if differ:
        raise UserError(f"{checkpoint_dir} holds the checkpoints of another model ({len(differ)} "
                        f"weight(s) differ, e.g. {'; '.join(differ[:3])}): run the config it "
                        "was trained with to resume it, or give another output_dir (or remove "
                        "that folder) to start over")


def save_rng_state(checkpoint: dict) -> None:
    """The global RNGs into ``checkpoint``, so that a resumed run draws what the uninterrupted
    one would have (they drive what takes no generator: dropout, a VAE's posterior sample).
    Every rank's CPU state, gathered to rank 0, which writes the checkpoint: the ranks'
    streams differ (their batches differ). A collective: every rank calls it, as Lightning's
    checkpoint dump does."""
    from fusion.distributed import all_ranks

    checkpoint["torch_rng"] = {"cpu": torch.get_rng_state(),
                               "cpu_per_rank": all_ranks(torch.get_rng_state())}
    if torch.cuda.is_available():
        checkpoint["torch_rng"]["cuda"] = torch.cuda.get_rng_state_all()


def restore_rng_state(checkpoint: dict, world_size: int, rank: int) -> None:
    """:func:`save_rng_state`'s states back: this rank's own, or rank 0's for every rank when
    the checkpoint was saved by another number of ranks."""
    rng = checkpoint.get("torch_rng") or {}
    per_rank = rng.get("cpu_per_rank") or []
    if len(per_rank) == world_size:
        torch.set_rng_state(per_rank[rank])
    elif "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
