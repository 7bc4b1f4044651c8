"""Running on several processes or machines with torch.distributed, launched by torchrun.

kdcli reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``); without it, everything runs in one process exactly as
before. Collectives time out after ``KDCLI_DIST_TIMEOUT`` seconds (default 300), so a rank
that dies never hangs the others forever; torchrun also stops the job when a worker fails.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdcli.errors import DistributedError, UsageError

if TYPE_CHECKING:
    import torch

DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Dist:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0 writes outputs and prints).
        world: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the CPU tensor ``t`` over all ranks (in place) and return it."""
        if self.enabled:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":  # nccl reduces GPU tensors only
                on_gpu = t.cuda()
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                t.copy_(on_gpu.cpu())
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True on every rank if ``ok`` is true on every rank."""
        if not self.enabled:
            return ok
        import torch

        flag = torch.tensor([0 if ok else 1])
        return int(self.all_reduce_sum(flag)) == 0

    def split(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` items."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world


def launched_rank() -> str:
    """The ``RANK`` torchrun gave this process, as text (``"0"`` without torchrun)."""
    return os.environ.get("RANK", "0")


def launched_world() -> str:
    """The ``WORLD_SIZE`` torchrun gave this job, as text (``"1"`` without torchrun)."""
    return os.environ.get("WORLD_SIZE", "1")


def from_env() -> Dist:
    """This process's :class:`Dist`, read from torchrun's environment variables."""
    try:
        world = int(launched_world())
        rank = int(launched_rank())
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise UsageError(f"bad torchrun environment ({e})",
                         "Launch with torchrun, or unset RANK and WORLD_SIZE") from e
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} does not fit WORLD_SIZE={world}",
                         "Launch with torchrun, or unset RANK and WORLD_SIZE")
    return Dist(rank, world, local)


def timeout_seconds() -> float:
    try:
        return float(os.environ.get("KDCLI_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError as e:
        raise UsageError(f"KDCLI_DIST_TIMEOUT={os.environ['KDCLI_DIST_TIMEOUT']!r} is not a "
                         "number", "Set it to seconds, e.g. 300") from e


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[Dist]:
    """Join the job's process group for the body (if launched by torchrun), then leave it.

    Uses gloo on CPU and nccl on CUDA. Nested use reuses the open group.

    Args:
        device: ``cpu`` or ``cuda``.
    """
    d = from_env()
    if not d.enabled:
        yield d
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield d
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UsageError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not",
                         "Launch with torchrun, which sets them")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
    try:
        dist.init_process_group(backend, rank=d.rank, world_size=d.world,
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
    except Exception as e:  # noqa: BLE001 - rendezvous failures come in many types
        raise DistributedError(f"rank {d.rank} could not join the process group ({e})",
                               "Check MASTER_ADDR/MASTER_PORT and that every rank started"
                               ) from e
    try:
        yield d
    finally:
        dist.destroy_process_group()

