"""The LightningModule shared by both families.

The family supplies a plain ``nn.Module`` (the model) and a loss callable
``loss_fn(model, documents, encode, rng, generator=) -> {"loss": ..., <parts>...}``, whose
``compute(model, prepared, encode, generator=)`` takes the batches that loader workers already
prepared (fusion.models.packing.PreparedBatch). This module adds what is the same for both:
AdamW with decoupled weight decay on layer weights only (:func:`weight_decay_groups`),
linear warm-up and cosine decay, an optional EMA of the weights, logging of every loss part, a
guard that skips non-finite updates, seeded per-step random streams that a resumed run
continues, and a frozen image tokenizer whose ``encode`` turns pixels into what the family
consumes.
"""

from __future__ import annotations

import math
import random
import time

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fusion.config import OptimConfig
from fusion.distributed import rank_seed_parts
from fusion.errors import UserError
from fusion.models.packing import PreparedBatch
from fusion.training.checkpointing import restore_rng_state, save_rng_state
from fusion.training.encode_cache import EncodeCache


class NonFiniteTrainingError(UserError):
    """Training diverged: too many steps in a row had a non-finite loss or gradient norm."""


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` holding a NaN or an infinity."""
    return [k for k, v in model.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def step_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, step, ...), the same in every process."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float,
                  progress: float | None = None) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``
    at ``total`` (Loshchilov & Hutter 2017, SGDR, without restarts). ``progress`` in [0, 1]
    overrides the step-based position on the cosine (used for a wall-clock budget)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Layers whose ``weight`` is decayed: the projections and kernels that carry the model's
# capacity. Everything else is left alone (see weight_decay_groups).
DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups, chosen by the kind of layer a parameter belongs to.

    Decayed: the ``weight`` of linear and convolution layers (:data:`DECAYED_LAYERS`).
    Not decayed:

    * norm gains and biases (RMSNorm, LayerNorm, GroupNorm, the per-head QK-norm of
      Chameleon): decay pulls a gain toward 0, which is not a prior on the function but a
      rescaling the next layer must undo (QK-norm's gains set the attention temperature);
    * every bias;
    * embedding tables (``nn.Embedding``, learned position tables), tied output heads
      included: decoupled decay shrinks every row every step, so rows of rare tokens (or
      image codes) that seldom get a gradient decay toward zero;
    * any other free parameter (gates, scales), for the same reason as norms.

    The kind of layer, not the tensor's rank, decides: a QK-norm gain has shape (H, 1, Dh),
    a rank the old ``p.dim() >= 2`` rule decayed. Tied parameters are placed once; a tensor
    owned by an embedding is never decayed. Returns ``[decay group, no-decay group]``."""
    decay: dict[int, nn.Parameter] = {}
    keep: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, DECAYED_LAYERS) and name == "weight":
                decay.setdefault(id(p), p)
            else:
                keep[id(p)] = p
    for key in keep:  # tied to an embedding (or any non-decayed owner): not decayed
        decay.pop(key, None)
    return [{"params": list(decay.values()), "weight_decay": weight_decay},
            {"params": list(keep.values()), "weight_decay": 0.0}]


class CosineClock:
    """Where training is on the warm-up + cosine schedule when a budget may end it.

    A budget is wall-clock seconds (``budget_s``) or training FLOPs (``budget_flops``, counted
    with :meth:`add_flops`). With one set, the cosine reaches its end at whichever comes first,
    ``total`` steps or the budget, and :meth:`expired` tells the module to stop there, so a
    budgeted run still anneals fully instead of being cut mid-schedule (what Lightning's
    ``max_time`` does). Without a budget the schedule is step-based. A FLOP budget is as
    reproducible as a step count (the same data give the same FLOPs on any machine); with a
    time budget the step count depends on the machine's speed and load. Shared by both
    training stages."""

    def __init__(self, warmup: int, min_ratio: float, budget_s: float | None = None,
                 budget_flops: float | None = None):
        for name, value in (("time_budget_s", budget_s), ("flops_budget", budget_flops)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or null, got {value}")
        self.warmup, self.min_ratio = warmup, min_ratio
        self.budget_s, self.budget_flops = budget_s, budget_flops
        self._start: float | None = None
        self._spent = 0.0  # seconds trained before a resume (from the checkpoint)
        self._agreed: float | None = None  # rank 0's reading at this step (see agree)
        self.flops = 0.0  # training FLOPs so far, all ranks together (add_flops)

    def start(self) -> None:
        self._start = time.monotonic() - self._spent
        self._agreed = None

    def agree(self, broadcast) -> None:
        """Every data-parallel rank takes rank 0's reading for this step.
        ``broadcast(obj, src)`` is the strategy's (``trainer.strategy.broadcast``). Ranks'
        clocks drift apart; with their own readings they would set different learning rates
        (weights that drift apart) and stop at different steps (a rank left waiting). Without a
        time budget the schedule needs no clock reading and nothing is exchanged."""
        if self.budget_s and self._start is not None:
            self._agreed = float(broadcast(time.monotonic() - self._start, 0))

    def add_flops(self, flops: float) -> None:
        """One step's training FLOPs, summed over the ranks (every rank adds the same)."""
        self.flops += float(flops)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed(), "flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run continues the budget where the checkpoint left it."""
        self._spent = float(state.get("elapsed_s", 0.0))
        self.flops = float(state.get("flops", 0.0))

    def elapsed(self) -> float:
        if self._agreed is not None:
            return self._agreed
        return self._spent if self._start is None else time.monotonic() - self._start

    def _spent_shares(self) -> list[float]:
        """How much of each budget that is set is spent (1 = all)."""
        return ([self.elapsed() / self.budget_s] if self.budget_s else []) + (
            [self.flops / self.budget_flops] if self.budget_flops else [])

    def expired(self) -> bool:
        return any(share >= 1.0 for share in self._spent_shares())

    def progress(self, step: int, total: int) -> float | None:
        """Position on the cosine: the largest of the step fraction and the budgets' spent
        shares (None without a budget: :func:`warmup_cosine` then uses the steps alone; a
        ``total`` of -1, no step limit, leaves the budgets alone)."""
        shares = self._spent_shares()
        if not shares:
            return None
        steps = [(step - self.warmup) / max(1, total - self.warmup)] if total > 0 else []
        return max(steps + shares)

    def multiplier(self, step: int, total: int) -> float:
        return warmup_cosine(step, self.warmup, total, self.min_ratio,
                             self.progress(step, total))


class FusionModule(L.LightningModule):
    def __init__(self, model: nn.Module, loss_fn, image_tokenizer: nn.Module | None,
                 optim: OptimConfig, max_steps: int, seed: int = 0,
                 encode_cache_mb: float = 0.0, activation_checkpointing: bool = False,
                 flops_per_position: float = 0.0):
        """``encode_cache_mb``: host memory for memoised tokenizer outputs (EncodeCache;
        scripts/train.py passes the config's ``encode_cache_mb``); 0 = encode every time.
        ``activation_checkpointing``: recompute each transformer block's activations in the
        backward pass (``trainer.activation_checkpointing``).
        ``flops_per_position``: training FLOPs per packed position that is not padding
        (:func:`fusion.models.transformer.training_flops_per_position`); the module counts
        them (``clock.flops``) and ``optim.flops_budget`` ends the run on them."""
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        # Frozen stage 1 (docs/design.md, Training stages), kept out of the module tree: it is not
        # trained, so it stays out of checkpoints (it has its own artifact) and out of
        # Lightning's train/eval-mode bookkeeping; on_fit_start moves it to the device.
        self._frozen = (image_tokenizer.requires_grad_(False).eval()
                        if image_tokenizer is not None else None,)
        self.optim, self.max_steps, self.seed = optim, max_steps, seed
        self.activation_checkpointing = activation_checkpointing
        self.ema = self._averaged(model) if optim.ema_decay else None
        self._rng = random.Random(seed)
        self.encode_cache = (EncodeCache(image_tokenizer.encode, int(encode_cache_mb * 2**20))
                             if image_tokenizer is not None else None)
        if optim.flops_budget and not flops_per_position:
            raise UserError("optim.flops_budget needs the FLOPs of a training position; "
                            "scripts/train.py passes them (flops_per_position)")
        self.flops_per_position = flops_per_position
        self.clock = CosineClock(optim.warmup_steps, optim.min_lr_ratio, optim.time_budget_s,
                                 optim.flops_budget)
        # Non-finite guard (on_before_optimizer_step): steps skipped in a row and in all.
        self.nonfinite_streak, self.nonfinite_steps = 0, 0
        self._window_finite = True  # every loss since the last optimizer step was finite
        self._skipped_update = False

    @property
    def image_tokenizer(self) -> nn.Module | None:
        return self._frozen[0]

    def _averaged(self, model: nn.Module) -> AveragedModel:
        """The EMA of ``model``'s weights (a copy, updated after every applied step)."""
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.optim.ema_decay))

    def configure_model(self) -> None:
        """Activation checkpointing, and under ``trainer.strategy=fsdp`` the FSDP2 plan
        (fusion.training.sharding). Lightning calls this on every rank before the optimizer
        exists; a second call changes nothing."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from fusion.training.sharding import checkpoint_blocks, is_sharded, shard_model

        if self.activation_checkpointing:
            checkpoint_blocks(self.model)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy) or is_sharded(self.model):
            return
        if self.ema is not None:  # FSDP2 modules cannot be deep-copied: the copy comes first
            self.ema = self._averaged(self.model)
        bf16 = str(self.trainer.precision).startswith("bf16")
        for model in (self.model, self.ema.module if self.ema is not None else None):
            if model is not None:
                shard_model(model, strategy.device_mesh["data_parallel"], bf16)

    def on_fit_start(self) -> None:
        if self.image_tokenizer is not None:
            self.image_tokenizer.to(self.device)

    def on_train_start(self) -> None:
        self.clock.start()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cosine_clock"] = self.clock.state_dict()
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        save_rng_state(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.clock.load_state_dict(checkpoint.get("cosine_clock", {}))
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        restore_rng_state(checkpoint, self.trainer.world_size, self.trainer.global_rank)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_cache(pixels)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # Batches are lists of Documents (frozen dataclasses); the family's loss moves the
        # tensors it builds from them, so Lightning's recursive transfer is skipped.
        return batch

    def _rank_tag(self) -> tuple:
        """Seed parts naming this data-parallel rank (:func:`rank_seed_parts`)."""
        return rank_seed_parts(self.global_rank if self._trainer is not None else 0)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.clock.agree(self.trainer.strategy.broadcast)

    def _loss(self, model: nn.Module, batch, rng_parts: tuple, generator: torch.Generator):
        """The family loss of a batch: prepared by the loader (its draws made there, seeded by
        the batch's place in the data, fusion.data.datamodule.PrepareBatches), or a list of
        Documents prepared here with ``rng_parts`` as the seed."""
        if isinstance(batch, PreparedBatch):
            return self.loss_fn.compute(model, batch, self.encode, generator=generator)
        rng = random.Random("/".join(map(str, rng_parts)))
        return self.loss_fn(model, batch, self.encode, rng, generator=generator)

    def training_step(self, batch, batch_idx):
        # Noise levels and noise (and, for unprepared batches, caption dropout and CM3 spans)
        # draw from generators seeded by (seed, step, batch, rank): a resumed run continues the
        # same streams, and the ranks' streams differ (the same noise on every rank would
        # correlate their gradients).
        g = torch.Generator(device=self.device).manual_seed(
            step_seed("train", self.seed, self.global_step, batch_idx, *self._rank_tag()))
        out = self._loss(self.model, batch, (self.seed, self.global_step, *self._rank_tag()), g)
        self._count_flops(out.pop("positions", None))
        self._window_finite &= bool(torch.isfinite(out["loss"].detach()))
        # sync_dist: the logged value is the mean over the ranks, what one process with the
        # whole global batch would log (up to how the ranks' token counts weigh it).
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True,
                      batch_size=len(batch), sync_dist=True)
        if self.encode_cache is not None and self.encode_cache.max_bytes > 0:
            self.log("train/encode_cache_hit_share", self.encode_cache.last_hit_share,
                     batch_size=len(batch))
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        g = torch.Generator(device=self.device).manual_seed(
            step_seed("val", self.seed, batch_idx, *self._rank_tag()) if self._rank_tag()
            else self.seed + batch_idx)
        out = self._loss(self.eval_model, batch, ("val", batch_idx, *self._rank_tag()), g)
        out.pop("positions", None)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=len(batch),
                      sync_dist=True)

    def _count_flops(self, positions: torch.Tensor | None) -> None:
        """Adds this step's training FLOPs, every rank's positions together, to the clock."""
        if positions is None or not self.flops_per_position:
            return
        positions = positions.detach().to(self.device, torch.float64)
        if self.trainer.world_size > 1:  # a budget counts the whole global batch
            positions = self.trainer.strategy.reduce(positions, reduce_op="sum")
        self.clock.add_flops(float(positions) * self.flops_per_position)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA weights when EMA is on, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update when a loss since the last step, or the gradient norm, is not
        finite: the gradients are dropped, so AdamW changes no weight and no moment. More than
        ``optim.max_nonfinite_steps`` such steps in a row stop the run
        (:class:`NonFiniteTrainingError`); no checkpoint is written during a streak
        (fusion.training.checkpointing.FusionCheckpoint), so the newest one predates it."""
        finite, self._window_finite = self._window_finite, True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and self.trainer.precision != "16-mixed":  # fp16's GradScaler skips infs
            finite = finite and bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        # Gradients are all-reduced under DDP, but losses are per rank: skip if any rank must.
        skip = self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        self._skipped_update = skip
        if not skip:
            self.nonfinite_streak = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.nonfinite_steps += 1
        step = self.global_step
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
        limit = self.optim.max_nonfinite_steps
        if self.nonfinite_streak > limit:
            raise NonFiniteTrainingError(
                f"training diverged: the loss or gradient norm was not finite at "
                f"{self.nonfinite_streak} steps in a row (steps {step - self.nonfinite_streak + 1}"
                f"-{step}, more than optim.max_nonfinite_steps={limit}); no update was applied "
                f"at those steps and no checkpoint was written during them. Lower optim.lr "
                f"(now {self.optim.lr:g}) or raise optim.warmup_steps, then resume from the "
                "last checkpoint, or check the data")
        self.print(f"warning: step {step}: non-finite loss or gradient norm, update skipped "
                   f"({self.nonfinite_streak} in a row, {self.nonfinite_steps} in all)")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None and not self._skipped_update:
            self.ema.update_parameters(self.model)
        if self.clock.expired():
            self.trainer.should_stop = True  # the cosine has reached its end

    def configure_optimizers(self):
        o = self.optim
        opt = torch.optim.AdamW(weight_decay_groups(self.model, o.weight_decay), lr=o.lr,
                                betas=(o.beta1, o.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: self.clock.multiplier(s, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
