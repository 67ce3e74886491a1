"""Multi-process evaluation: whole batches are dealt round-robin to the processes, results gathered in order.

Sharding by batch (not by item) keeps every batch identical to the single-process run, so a K-process run
gives exactly the metrics of a 1-process run. Started by ``torchrun --nproc_per_node K`` (RANK, WORLD_SIZE,
LOCAL_RANK in the environment); gloo on cpu, nccl on cuda. Single process needs no torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_from_env", "shard", "gather_in_order", "all_max", "spawn_local"]

T = TypeVar("T")


@dataclass
class DistContext:
    """Who this process is; ``world == 1`` means plain single-process evaluation."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_from_env(device: Optional[str] = None) -> DistContext:
    """Join the process group torchrun set up (if any); pick the device (cuda:LOCAL_RANK when on cuda)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return DistContext(device=want)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if want.type == "cuda":
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), device=want, owns_group=owns)


def shard(items: Sequence[T], ctx: DistContext) -> list[tuple[int, T]]:
    """(global index, item) of the items this process handles: every world-th one, starting at its rank."""
    return [(i, items[i]) for i in range(ctx.rank, len(items), ctx.world)]


def gather_in_order(local: list[tuple[int, Any]], total: int, ctx: DistContext) -> list[Any]:
    """Collect (global index, value) pairs from every process into one list ordered by index."""
    pieces = [local]
    if ctx.active:
        pieces = [None] * ctx.world  # type: ignore[list-item]
        dist.all_gather_object(pieces, local)
    out: list[Any] = [None] * total
    for piece in pieces:
        for index, value in piece:
            out[index] = value
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise RuntimeError(f"distributed gather lost {len(missing)} of {total} entries (first: {missing[:5]})")
    return out


def all_max(value: float, ctx: DistContext) -> float:
    """The largest value over all processes (e.g. wall time: throughput = items / slowest process)."""
    if not ctx.active:
        return value
    values = [None] * ctx.world
    dist.all_gather_object(values, float(value))
    return max(values)  # type: ignore[type-var]


def _spawn_entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = fn(*args)
    finally:
        dist.destroy_process_group()


def spawn_local(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` gloo processes on localhost; returns each rank's return value.

    For tests and quick checks; real runs use torchrun. ``fn`` must be importable (module level).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_spawn_entry, args=(world, port, fn, args, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]
