"""torch.distributed plumbing: read torchrun's environment, pick the backend, reduce, shut down cleanly.

Only the CLI entry calls `init` and `shutdown`; everything else asks `Dist` for its rank and world size
and works unchanged in a single process.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (counters, losses); a no-op in one process."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all_gather_str(self, value: str) -> list[str]:
        if not self.enabled:
            return [value]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return [str(v) for v in out]

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init(backend: str = "auto", timeout_min: int = 30) -> Dist:
    """Join the process group torchrun (or SLURM via torchrun) describes; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(0, 1, 0, device)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(minutes=timeout_min),
        device_id=device if backend == "nccl" else None,
    )
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, device, backend)
    return Dist(rank, world, local_rank, device)


def shutdown() -> None:
    """Tear down the process group once the DDP model is gone.

    gloo aborts the process at exit (SIGABRT) if a DistributedDataParallel reducer is still alive when
    the group is destroyed: callers must have dropped every reference (the trainer's DDP wrapper lives
    only inside `train`), and collecting here frees reference cycles before the group goes.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
