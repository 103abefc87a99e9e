"""Stopping on a signal without losing work: SIGTERM, SIGINT and SIGUSR1 end a long job at a point
where everything done so far is saved, and the same command resumes it.

Clusters end jobs with a signal: SLURM sends SIGTERM at the time limit (or a chosen signal some
time before it, `--signal=USR1@120`), Kubernetes sends SIGTERM and waits its grace period, a
terminal sends SIGINT on Ctrl-C. While a stage runs inside `StopSignals`, the first of these
signals only sets a flag; the stage looks at it at its next safe point (training: after the
current optimisation step; precompute: before its next batch), saves what it has, logs one line
and raises `Stopped`, which the CLI turns into exit code 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT, 138 for SIGUSR1), the code a shell reports for a process the signal
killed, so schedulers and scripts see the job as ended by the signal.

A second signal while the job is stopping is ignored (until the process exits): the job is
already on its way out, and what it writes is written atomically (`pipeline.atomic`), so even
SIGKILL in the middle of the write leaves the previous checkpoint whole; SIGKILL ends the job
at once, losing the steps since that checkpoint.

DataLoader workers ignore the three signals (`ignore_in_worker`): a scheduler signals every
process of the job, and a worker that died of it would crash the main process's next batch
before it could save. The main process stops its workers when it exits.

Under torchrun, whichever rank receives the signal, the ranks stop at the same step
(`StopVote`): every step each rank adds its flag to a tiny all-reduce whose result it reads
one step later, so the vote never makes the host wait for the device's current step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Stopped(Exception):
    """A stage stopped on a signal after saving its work; the CLI exits with `exit_code`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """While active (a `with` block on the main thread), the first SIGTERM, SIGINT or SIGUSR1 is
    recorded in `received` instead of ending the process; later ones are ignored. The previous
    handlers come back when the block ends, unless it ends by `Stopped`: then the process goes on
    ignoring the three signals until it exits. Off the main thread (where Python cannot take
    signals) it records nothing and changes nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        # A job that stopped ignores the signals until it exits: under torchrun the first rank to
        # exit makes torchrun signal the others, which have saved already and are exiting too.
        stopping = isinstance(exc, Stopped)
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_IGN if stopping else handler)
        self.previous.clear()

    def handle(self, signum: int, _frame: Any) -> None:
        # no logging here: a handler may run inside a logging call that holds the handler's lock
        if self.received is None:
            self.received = signum


def ignore_in_worker(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: the worker ignores the stop signals (see the module's text)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopVote:
    """The ranks' agreement on when to stop, polled once per step on every rank.

    One process: `poll` returns the signal received so far, so the job stops after the step in
    progress when the signal came. Under torchrun: each `poll` starts an all-reduce (max) of this
    rank's signal number and returns the result of the previous poll's, so every rank sees the
    same value at the same step: they stop together, one step after the first rank that received
    a signal took it. Every rank must call `poll` the same number of times (they run the same
    steps), and `settle` where the steps end.
    """

    def __init__(self, signals: StopSignals, device: torch.device) -> None:
        self.signals = signals
        self.distributed = dist.is_initialized()
        nccl = self.distributed and dist.get_backend() == "nccl"
        self.device = device if nccl else torch.device("cpu")
        self.pending: tuple[torch.Tensor, Any] | None = None

    def poll(self) -> int | None:
        """The signal to stop on now, or None to go on."""
        if not self.distributed:
            return self.signals.received
        vote = torch.tensor([self.signals.received or 0], dtype=torch.int32, device=self.device)
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, async_op=True)
        previous, self.pending = self.pending, (vote, work)
        return self.result(previous)

    def settle(self) -> int | None:
        """Where the steps end (an epoch's end): the last poll's result and a vote on every signal
        received until now, waited for, so that no reduction is left in flight and a signal that
        came during the last steps is not carried over to the next ones."""
        if not self.distributed:
            return self.signals.received
        previous, self.pending = self.pending, None
        earlier = self.result(previous)
        vote = torch.tensor([self.signals.received or 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return earlier or int(vote.item()) or None

    @staticmethod
    def result(reduction: tuple[torch.Tensor, Any] | None) -> int | None:
        if reduction is None:
            return None
        vote, work = reduction
        work.wait()
        return int(vote.item()) or None
