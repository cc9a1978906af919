"""Fully sharded data parallel training (``trainer=fsdp``): FSDP2 through Lightning.

Lightning 2.6 offers two ways: ``FSDPStrategy`` wraps the model in FSDP1
(``FullyShardedDataParallel``), and ``ModelParallelStrategy`` hands the LightningModule a
device mesh and lets it apply FSDP2's ``fully_shard`` in ``configure_model``. fusion uses the
second: PyTorch recommends FSDP2 for new code (FSDP1's state-dict API warns that it is being
deprecated on torch 2.13), its parameters are plain DTensors (an optimizer, gradient clipping
and ``state_dict`` work unchanged), and it runs on the CPU with gloo, where ``FSDPStrategy``
refuses anything but a GPU, so the sharded path is tested on every machine (docs/scaling.md).

The plan (:func:`shard_model`): one FSDP unit per transformer block plus the root, which holds
the embeddings, the heads (tied weights stay in one unit) and the family's image parts; bf16
parameters with float32 gradient reduction when the trainer's precision is bf16; optionally
each block's activations recomputed in the backward pass (:func:`checkpoint_blocks`).
Checkpoints are sharded directories (torch.distributed.checkpoint), swapped in whole
(:class:`ShardedStrategy`); the model folder at the end is the full state dict gathered to
rank 0 (:func:`full_state_dict`), the same safetensors file one process writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from fusion.models.transformer import TransformerBlock

SHARDED = "fsdp"  # trainer.strategy value that selects ShardedStrategy


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP: every rank one data-parallel shard (no
    tensor parallelism), sharded checkpoints. A checkpoint is written next to its path and
    moved in when complete, so a kill mid-write leaves the previous checkpoint whole, as
    :class:`~fusion.training.checkpointing.AtomicCheckpointIO` does for single files."""

    def __init__(self, world_size: int, **kwargs):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=True, **kwargs)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("sharded-checkpoint-start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("sharded-checkpoint-written")
        if self.global_rank == 0:  # a kill between the renames leaves .old or .partial whole
            if path.exists():
                path.rename(old)
            partial.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("sharded-checkpoint-moved")


def sharded_strategy(devices, num_nodes: int) -> ShardedStrategy:
    """The strategy for ``trainer.strategy=fsdp`` on ``devices`` per node (-1: every GPU)."""
    if devices in (-1, "auto"):
        devices = torch.cuda.device_count()
        if devices == 0:
            from fusion.errors import UserError

            raise UserError("trainer=fsdp with trainer.devices=-1 counts GPUs and found none; "
                            "on a CPU pass trainer.accelerator=cpu trainer.devices=N")
    return ShardedStrategy(int(devices) * int(num_nodes))


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every transformer block of ``model`` so that its activations are recomputed in the
    backward pass instead of kept (Chen et al. 2016, arXiv:1604.06174): memory per block falls
    to its input, for about one more forward pass of compute. State-dict keys are unchanged.
    Returns the number of blocks wrapped (0 when already wrapped)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, CheckpointWrapper):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, TransformerBlock):
                setattr(parent, name, checkpoint_wrapper(child))
                wrapped += 1
    return wrapped


def shard_model(model: nn.Module, mesh, bf16: bool) -> None:
    """FSDP2 over ``mesh``: each transformer block its own unit, then the root (the rest)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    # The root too gives its gathered weights back after a forward: the EMA copy runs forwards
    # without a backward (validation, sample grids), after which FSDP would otherwise leave it
    # unsharded, plain tensors that its next update cannot mix with the model's DTensors.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of ``model`` as CPU tensors: gathered from the shards to rank 0
    (other ranks get ``{}``; a collective, every rank must call it) when ``model`` is sharded,
    else its own."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
