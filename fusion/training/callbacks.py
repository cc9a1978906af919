"""Callbacks: sample grids during and after training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from fusion.data.images import save_grid, to_uint8


class SampleGrid(L.Callback):
    """Generates images for fixed prompts every ``every_n_steps`` (0 = at the end only), saves
    ``<out_dir>/samples/step<N>.png`` and logs it to wandb when wandb is the logger.

    ``make_sampler(model) -> callable(prompt_texts) -> pixels (B, 3, H, W)`` is supplied by the
    family, so this callback knows nothing about how images are made. ``build_model() -> a
    fresh model`` is needed under ``trainer=fsdp``, where rank 0 samples from a whole copy.
    """

    def __init__(self, make_sampler, prompts: list[str], out_dir: str | Path,
                 every_n_steps: int = 0, build_model=None):
        self.make_sampler, self.prompts = make_sampler, list(prompts)
        self.build_model = build_model  # () -> a fresh unsharded model (trainer=fsdp)
        self.out_dir, self.every = Path(out_dir), every_n_steps
        self.last_path: Path | None = None

    def _grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from fusion.training.sharding import full_state_dict, is_sharded

        if not self.prompts:
            return
        model = pl_module.eval_model
        if is_sharded(model):
            # The samplers call the model's parts one by one, which FSDP's hooks do not see:
            # rank 0 samples from a whole copy, gathered from every rank's shard.
            if self.build_model is None:
                raise RuntimeError("SampleGrid needs build_model to sample a sharded model")
            weights = full_state_dict(model)  # a collective: every rank is here
            if trainer.global_rank != 0:
                return
            model = self.build_model().to(pl_module.device)
            model.load_state_dict(weights)
        elif trainer.global_rank != 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        model.eval()
        with torch.no_grad():
            pixels = self.make_sampler(model)(self.prompts)
        pl_module.train(was_training)
        path = self.out_dir / "samples" / f"step{trainer.global_step:07d}.png"
        save_grid(list(to_uint8(pixels)), path, self.prompts, columns=min(8, len(self.prompts)))
        self.last_path = path
        logger = trainer.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            logger.log_image("samples", [str(path)], step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < (trainer.max_steps or 0):
            self._grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._grid(trainer, pl_module)


class DataPosition(L.Callback):
    """Where training is in its data, saved in every checkpoint, so that a resumed run sees
    exactly the batches the interrupted run would have seen next (none repeated, none
    skipped).

    Indexed data: the epoch and the batches drawn from it. Streamed shards: also each loader
    worker's position on every rank (the ``stream_position`` of the last batch it gave,
    fusion.data.shards) and whose batch comes next, gathered to rank 0, since rank 0 writes
    the checkpoint. On resume the datamodule is positioned as soon as the checkpoint is read
    (:meth:`DocumentDataModule.resume_at <fusion.data.datamodule.DocumentDataModule.resume_at>`,
    which also takes a stream saved by another layout of ranks and loader workers):
    Lightning creates the training iterator before ``on_train_start``, and loader workers
    fetch their first batches as soon as it exists."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, 0
        self.stream: dict[int, list[int]] = {}  # worker -> [worker, epoch, block, index]
        self.readers: list[int] = []  # [ranks, loader workers] of a streamed run
        self.last_worker = 0  # the reader role of the last batch trained
        self.carry_from: list | None = None  # rank 0: where carried-over blocks come from
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # before the checkpoint is restored (load_state_dict)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.fit_loop.restarting:  # the epoch a checkpoint stopped in goes on
            return
        self.epoch, self.batches = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1  # trained: a checkpoint from now on has it behind it
        position = getattr(batch, "stream_position", None)
        if position is not None:
            self.stream[position.worker] = position.as_list()
            self.last_worker = position.worker
            self.readers = [trainer.world_size, max(1, trainer.datamodule.cfg.num_workers)]

    def state_dict(self) -> dict:
        from fusion.distributed import all_ranks

        mine = {str(k): v for k, v in self.stream.items()}
        if self.stream:
            mine["readers"] = self.readers  # [ranks, workers]: the split the positions are of
            mine["next"] = (self.last_worker + 1) % self.readers[1]  # whose batch comes next
        if self.carry_from:  # a resume with another layout (DocumentDataModule.resume_at)
            mine["carry_from"] = self.carry_from
        # every rank saves a checkpoint's state (Lightning's dump_checkpoint), so all gather
        return {"epoch": self.epoch, "batches": self.batches, "stream": all_ranks(mine)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        streams = state.get("stream") or []
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "resume_at"):
            raise RuntimeError("DataPosition resumes a fusion DocumentDataModule only")
        mine = datamodule.resume_at(self.epoch, self.batches, streams)
        if mine:
            self.stream = {int(k): list(v) for k, v in mine.items() if k.isdigit()}
            self.readers = list(mine["readers"])
            self.last_worker = (int(mine["next"]) - 1) % self.readers[1]
            self.carry_from = mine.get("carry_from")


class StepTimer(L.Callback):
    """Logs the wall time of each training step (``perf/step_seconds``: from one batch's end
    to the next, so loading, the step and any callback work between them all count) and the
    documents per second it amounts to over all ranks (``perf/documents_per_second``: the
    global batch over the step time). ``scripts/bench.py ddp`` reads them back."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        now = time.perf_counter()
        if self._last is not None:
            seconds = now - self._last
            pl_module.log_dict({"perf/step_seconds": seconds,
                                "perf/documents_per_second": len(batch) * trainer.world_size
                                / seconds}, rank_zero_only=True, batch_size=1)
        self._last = now
