"""Several processes, one job: which process this is, and work split over ranks and gathered.

Training runs its ranks through Lightning (``trainer=ddp``, ``trainer=fsdp``), which starts
the processes and the process group. Sampling and evaluation are not Lightning loops: launched
with ``torchrun --nproc-per-node N scripts/evaluate.py ...`` (or under SLURM, docs/scaling.md),
they call :func:`init_from_env` and share their batches with :func:`map_split`. Alone, every
function here is a no-op that returns what one process would.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(world size, global rank) of the default process group; (1, 0) without one."""
    if not _group_ready():
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(), dist.get_rank()


def is_first_process() -> bool:
    """Whether this process is rank 0, also before any process group exists: what the
    launcher put in the environment (torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or
    Lightning's own launcher's ``NODE_RANK`` and ``LOCAL_RANK``) decides. Files that one
    process must write before the Trainer starts (a log's resume, a run id) are written here
    only."""
    if _group_ready():
        return world()[1] == 0
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return all(int(os.environ.get(key, 0)) == 0 for key in ("NODE_RANK", "LOCAL_RANK"))


def init_from_env() -> tuple[int, int]:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 and ``MASTER_ADDR`` in
    the environment, as torchrun and ``srun`` with the variables of docs/scaling.md set them):
    NCCL with one GPU per local rank where CUDA is available, else gloo. Returns
    (world size, rank); (1, 0) when the process runs alone."""
    if _group_ready():
        return world()
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 1, 0
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


@contextmanager
def process_group_from_env() -> Iterator[tuple[int, int]]:
    """:func:`init_from_env` for the length of a ``with`` block, yielding (world size, rank),
    and the group left at its end. A job that ends well meets the other ranks at a barrier
    first, so no rank closes its connections while another still reads them; then the group is
    destroyed before the interpreter exits. Left to interpreter teardown, gloo's worker threads
    can be destroyed while joinable, which aborts the process (SIGABRT, "terminate called
    without an active exception") after all its work is done. On an error the group is
    destroyed without the barrier: the other ranks may never reach it. A group that existed
    before the block (Lightning's) is left alone."""
    joined = not _group_ready()
    size_rank = init_from_env()
    try:
        yield size_rank
    except BaseException:
        if joined:
            leave_process_group(meet_first=False)
        raise
    if joined:
        leave_process_group()


def leave_process_group(meet_first: bool = True) -> None:
    """Destroy the default process group, after a barrier when ``meet_first`` (every rank must
    then call it); a no-op without one. See :func:`process_group_from_env` for the reason."""
    if not _group_ready():
        return
    import torch.distributed as dist

    if meet_first:
        dist.barrier()
    dist.destroy_process_group()


def rank_seed_parts(rank: int) -> tuple[str, ...]:
    """Seed parts naming data-parallel rank ``rank``: none on rank 0, so a single process
    draws the same random streams whatever launched it, and another rank's differ."""
    return (f"rank{rank}",) if rank else ()


def all_ranks(obj: T) -> list[T]:
    """``obj`` from every process of the default process group, in rank order (``[obj]``
    alone). A collective: every rank must call it."""
    size = world()[0]
    if size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * size
    dist.all_gather_object(gathered, obj)
    return gathered


def check_split(n_items: int, what: str) -> None:
    """Every rank needs at least one of ``n_items`` (a rank with none would leave the others
    waiting at the gather with nothing to show for its device)."""
    size = world()[0]
    if n_items < size:
        from fusion.errors import UserError

        raise UserError(f"{n_items} {what} cannot be split over {size} processes: every "
                        f"process needs at least one; launch at most {max(1, n_items)}")


def map_split(fn: Callable[[int, T], R], items: Sequence[T],
              desc: str | None = None) -> list[R]:
    """``[fn(i, items[i]) for i in range(len(items))]``, with the items dealt round-robin to
    the ranks and every rank given the whole list back, in order. With ``fn`` seeded by the
    item's index (as the evaluators seed batch ``b`` with ``seed + b``), the result equals one
    process's whatever the number of ranks. A rank left without an item (fewer batches than
    ranks) only gathers. ``desc``: a progress bar over rank 0's share."""
    from tqdm.auto import tqdm

    size, rank = world()
    mine = range(rank, len(items), size)
    bar = tqdm(mine, desc=desc, disable=desc is None or rank != 0)
    done = [(i, fn(i, items[i])) for i in bar]
    out: list = [None] * len(items)
    for part in all_ranks(done):
        for i, result in part:
            out[i] = result
    return out


def quiet_other_ranks() -> None:
    """On every rank but 0, send standard output nowhere: one process reports what all of them
    computed together. Errors (standard error) still reach the user from every rank."""
    import sys

    if not is_first_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
