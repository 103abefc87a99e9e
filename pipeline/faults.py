"""A test hook: the process kills itself with SIGKILL, or sends itself SIGTERM, at an exact
point of its work.

The tests of resume-after-a-crash and of stopping on a signal set it instead of racing a timer
against the run:

    CSM_DISTILL_FAULT=kill-after-step:N    distill and supervised (`pipeline.training`)
    CSM_DISTILL_FAULT=kill-after-shard:N   precompute (`stages.precompute`)
    CSM_DISTILL_FAULT=sigterm-at-step:N    distill, supervised, demo-teacher
    CSM_DISTILL_FAULT=sigterm-at-batch:N   precompute

`kill-after-step:N`: right after optimisation step N of the run (counted from 1 over all
epochs, `global_step` in last.pt) and after that step's checkpoint logic: the mid-epoch
checkpoint when --checkpoint-every divides N, or, when step N ends an epoch, the epoch's
checkpoint. So last.pt holds step N if one of them wrote it, else the last step that did.

`kill-after-shard:N`: right after this process has written its Nth part file in this run
(parts kept from an earlier run are not counted).

Under torchrun every process reads the variable and the processes meet at a barrier before
they die, so what is on disk does not depend on which one is faster: last.pt of rank 0, or
the first N parts of every process (each must have N shards to encode). Resume without the
variable or with a later point: the steps after the checkpoint are taken again on resume, so
the same value would kill the run again.

`sigterm-at-step:N`: the process sends itself SIGTERM just before optimisation step N, so the
signal is there while step N runs (`pipeline.preemption` takes it after the step).
`sigterm-at-batch:N`: the same before precompute's Nth batch of this run (in the middle of a
shard when a shard holds more than one batch). Under torchrun only the last rank signals itself,
as when a scheduler's signal reaches one process first: the others learn of it from that one.

Unset, the normal case, it costs one comparison per step or shard. Any other value is refused
in one line naming the variable. Not an option of the stages: nothing a user needs.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
from dataclasses import dataclass

from pipeline import distributed
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

VARIABLE = "CSM_DISTILL_FAULT"


@dataclass(frozen=True)
class Fault:
    point: str  # "step" or "shard" (kill-after), "step" or "batch" (sigterm-at)
    count: int  # the step, part file or batch the fault is tied to, from 1
    action: str = "kill-after"  # or "sigterm-at"


def parse(value: str) -> Fault:
    match = re.fullmatch(r"(kill-after)-(step|shard):([1-9][0-9]*)|(sigterm-at)-(step|batch):([1-9][0-9]*)", value)
    if match is None:
        raise PipelineError(
            f"environment {VARIABLE}={value!r}: expected kill-after-step:N, kill-after-shard:N, sigterm-at-step:N "
            f"or sigterm-at-batch:N with N >= 1 (a test hook, see pipeline/faults.py); unset it for a normal run"
        )
    if match[1]:
        return Fault(match[2], int(match[3]))
    return Fault(match[5], int(match[6]), "sigterm-at")


@functools.cache
def planned() -> Fault | None:
    """The fault the environment asks for (read once per process); None when the variable is unset or empty.

    The stages call it before any work, so that a wrong value is refused before anything is written.
    """
    value = os.environ.get(VARIABLE, "")
    return parse(value) if value else None


def kill_after(point: str, count: int) -> None:
    """Die by SIGKILL if the planned fault is after `point` number `count`; return otherwise."""
    fault = planned()
    if fault is None or fault != Fault(point, count):
        return
    log.warning("%s=kill-after-%s:%d: killing process %d with SIGKILL (a test hook)", VARIABLE, point, count,
                os.getpid())
    # under torchrun, no process dies before every one is here (its part of this step, or its N parts, done)
    distributed.barrier()
    os.kill(os.getpid(), signal.SIGKILL)


def signal_at(point: str, count: int) -> None:
    """Send this process SIGTERM if the planned fault is a signal at `point` number `count` (on
    the last rank only under torchrun); return otherwise."""
    fault = planned()
    if fault is None or fault != Fault(point, count, "sigterm-at"):
        return
    process = distributed.this_process()
    if process.rank != process.world - 1:
        return
    log.warning("%s=sigterm-at-%s:%d: sending SIGTERM to process %d (a test hook)", VARIABLE, point, count,
                os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
