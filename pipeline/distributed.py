"""torchrun support: which process this is, its device, barriers and sums across processes.

`torchrun --nproc-per-node N -m pipeline STAGE ...` starts N processes with RANK, WORLD_SIZE
and LOCAL_RANK set (and MASTER_ADDR/PORT for the rendezvous). Without torchrun, this is
process 0 of 1 and every function here is a no-op, so the stages have one code path.

Stage one only needs barriers and sums of counters: it uses a gloo group on every machine.
Stage two needs DistributedDataParallel: NCCL when the processes use GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

#: How long precompute's barriers wait for the slowest rank: its ranks can finish their shards
#: hours apart on a large dataset (they only meet at the start and the end).
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its /dev/shm and its GPUs)

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
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise PipelineError("environment RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                            "(set by torchrun)") from None
    if not 0 <= rank < world:
        raise PipelineError(f"environment RANK={rank} is outside WORLD_SIZE={world}")
    return Process(rank, world, local_rank, max(1, local_world))


def single_process_stage(stage: str) -> Process | None:
    """This process, for a stage that runs in one process (probe, bench), or None on the other
    ranks under torchrun, after one line: they return at once, and torchrun ends the job
    when rank 0 is done (the line is a warning: the CLI logs other ranks at that level only)."""
    process = this_process()
    if not process.main:
        log.warning("%s runs in one process: rank %d has nothing to do", stage, process.rank)
        return None
    return process


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def start(device: torch.device | None = None, timeout: datetime.timedelta = BARRIER_TIMEOUT,
          backend: str | None = None) -> Process:
    """Join the process group when started by torchrun; returns this process.

    `device` decides the backend unless `backend` is given: NCCL for CUDA, gloo otherwise. On CUDA this process's GPU
    (`local_device`) becomes the current device whatever the backend, so that nothing of this
    process (pin-memory threads, cuBLAS) opens a context on GPU 0. `timeout`: how long a
    collective waits for the other ranks before the job fails (training steps meet every
    step: minutes; precompute's ranks meet only at the start and the end: hours).
    """
    process = this_process()
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(local_device(device, process))
    if process.distributed and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return process


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with `local_rank` among `device_count` visible GPUs.

    torchrun shows every process all the machine's GPUs (local rank i takes GPU i); launchers
    that mask each task to its own GPU (SLURM `--gpus-per-task=1`, one container per GPU)
    show each process one GPU, index 0, whatever its local rank.
    """
    if device_count < 1:
        raise PipelineError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES?); use --device cpu")
    return local_rank % device_count


def local_device(device: torch.device, process: Process) -> torch.device:
    """cuda -> this process's GPU (`device_index`); cpu stays cpu. An explicit cuda:N is kept
    for a single process."""
    if device.type != "cuda" or (device.index is not None and not process.distributed):
        return device
    return torch.device("cuda", device_index(process.local_rank, torch.cuda.device_count()))


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
