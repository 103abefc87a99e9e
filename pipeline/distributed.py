"""torchrun support: which process this is, its device, barriers and sums across processes.

`torchrun --nproc-per-node N -m pipeline STAGE ...` starts N processes with RANK, WORLD_SIZE
and LOCAL_RANK set (and MASTER_ADDR/PORT for the rendezvous). Without torchrun, this is
process 0 of 1 and every function here is a no-op, so the stages have one code path.

Stage one only needs barriers and sums of counters: it uses a gloo group on every machine.
Stage two needs DistributedDataParallel: NCCL when the processes use GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

#: How long a barrier waits for the slowest rank: precompute's ranks can finish their shards
#: hours apart on a large dataset.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def this_process() -> Process:
    """Rank, world size and local rank from torchrun's environment (0, 1, 0 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise PipelineError("environment RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if not 0 <= rank < world:
        raise PipelineError(f"environment RANK={rank} is outside WORLD_SIZE={world}")
    return Process(rank, world, local_rank)


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def start(device: torch.device | None = None) -> Process:
    """Join the process group when started by torchrun; returns this process.

    `device` decides the backend: NCCL for CUDA (and selects cuda:LOCAL_RANK), gloo otherwise.
    """
    process = this_process()
    if process.distributed and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(process.local_rank)
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return process


def local_device(device: torch.device, process: Process) -> torch.device:
    """cuda -> this process's GPU (cuda:LOCAL_RANK); cpu stays cpu."""
    if device.type == "cuda" and process.distributed:
        return torch.device("cuda", process.local_rank)
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_across(values: list[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sums of `values` over all processes (the values themselves with one process)."""
    if not dist.is_initialized():
        return list(values)
    on = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
