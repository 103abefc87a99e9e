"""What a preempted distill loses, measured on the demo: a real signal mid-epoch, then the resume.

1. runs `python -m pipeline distill` with the params (the demo's by default) into a scratch
   folder, and once the first epoch's checkpoint is there, waits half an epoch more and sends
   the job a signal (SIGTERM by default) from outside, as a scheduler does;
2. records the exit code, the seconds from the signal to the exit, the stop line, and the step
   the checkpoint holds, against the checkpoint a `kill -9` would have left (the last periodic
   one: every `--checkpoint-every` steps, or the last epoch's end when that is 0);
3. runs the same command again, which resumes, and compares the student with `--reference`
   (default: the params' own student, which `make demo` trained uninterrupted with the same
   settings): the largest difference of any weight;
4. records it in docs/results/preemption.json (its page rendered by scripts/results.py).

    python scripts/preemption_check.py                     # the demo, SIGTERM
    python scripts/preemption_check.py --signal USR1 --json ""
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import results  # scripts/results.py, the one renderer of docs/results (run as a script, its folder is on sys.path)
import torch
from ablation import code_version, machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.cache import TeacherCache  # noqa: E402
from pipeline.config import load_config  # noqa: E402

STUDY = ROOT / "docs" / "results" / "preemption.json"


def distill_command(params: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--params", str(params), "distill",
            "--out", str(work / "student.pt"), "--run-dir", str(work / "run"),
            "--metrics", str(work / "distill.json"), "--plot", str(work / "distill.csv")]


def checkpoint_state(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError):
        return None  # being renamed into place
    return {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"], "global_step": state["global_step"]}


def signalled_run(command: list[str], work: Path, signum: int, log: Path) -> dict[str, Any]:
    """The run, signalled half an epoch after its first epoch's checkpoint."""
    checkpoint = work / "run" / "last.pt"
    started = time.monotonic()
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        while job.poll() is None and (checkpoint_state(checkpoint) or {"epoch": 0})["epoch"] < 1:
            time.sleep(0.5)
        if job.poll() is not None:
            raise SystemExit(f"distill ended before its first epoch's checkpoint (exit code {job.returncode}): "
                             f"{log.read_text()[-2000:]}")
        epoch_seconds = time.monotonic() - started  # the first epoch, with the job's start
        time.sleep(epoch_seconds / 2)
        sent = time.monotonic()
        job.send_signal(signum)
        code = job.wait(timeout=3600)
        exit_seconds = time.monotonic() - sent
    text = log.read_text()
    lines = [line for line in text.splitlines() if "stopped by" in line]
    return {"exit_code": code, "seconds_signal_to_exit": round(exit_seconds, 1),
            "stop_line": lines[-1] if lines else "", "first_epoch_seconds": round(epoch_seconds, 1),
            "state": checkpoint_state(checkpoint)}


def largest_difference(a: Path, b: Path) -> float:
    first = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    second = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    if first.keys() != second.keys():
        raise SystemExit(f"{a} and {b} hold different weights")
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first if first[k].numel())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--signal", default="TERM", choices=["TERM", "INT", "USR1"])
    parser.add_argument("--reference", type=Path, default=None,
                        help="an uninterrupted run's student (default: the params' distill.out)")
    parser.add_argument("--json", default=str(STUDY), help="the study file to record in ('' to record nothing)")
    args = parser.parse_args(argv)
    signum = getattr(signal, f"SIG{args.signal}")
    config = load_config("distill", args.params)
    reference = args.reference or ROOT / config.out
    steps_per_epoch = math.ceil(TeacherCache(ROOT / config.train.cache).num_images / config.train.batch_size)

    with tempfile.TemporaryDirectory(prefix="preemption-") as scratch:
        work = Path(scratch)
        command = distill_command(args.params, work)
        print(f"distill into {work}; {config.train.epochs} epochs of {steps_per_epoch} steps", flush=True)
        stop = signalled_run(command, work, signum, work / "signalled.log")
        state = stop["state"]
        if state is None or stop["exit_code"] != 128 + signum:
            raise SystemExit(f"the run did not stop on SIG{args.signal} as it should (exit code {stop['exit_code']}):\n"
                             + (work / "signalled.log").read_text()[-3000:])
        every = config.train.checkpoint_every
        periodic = (state["global_step"] // every * every if every
                    else state["epoch"] * steps_per_epoch)  # what kill -9 would have left
        print(f"exit code {stop['exit_code']} {stop['seconds_signal_to_exit']} s after SIG{args.signal}: "
              f"{stop['stop_line']}", flush=True)
        resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=7200)
        if resumed.returncode != 0:
            raise SystemExit(f"the resumed run failed (exit code {resumed.returncode}):\n{resumed.stderr[-3000:]}")
        resumed_line = next((line for line in resumed.stderr.splitlines() if "resuming distill" in line), "")
        difference = largest_difference(work / "student.pt", reference) if reference.is_file() else None

    figures = {
        "exit_code": stop["exit_code"],
        "seconds_signal_to_exit": stop["seconds_signal_to_exit"],
        "step_reached": state["global_step"],
        "last_periodic_step": periodic,
        "steps_lost_kill": state["global_step"] - periodic,
        "steps_lost_signal": 0,
        "steps_per_epoch": steps_per_epoch,
        "largest_weight_difference": difference,
    }
    print(f"step {state['global_step']} saved (epoch {state['epoch'] + 1}, step {state['step_in_epoch']}); "
          f"kill -9 would have left step {periodic}: {figures['steps_lost_kill']} steps lost. {resumed_line.strip()}; "
          f"largest weight difference from {reference}: {difference}")
    if not args.json:
        return 0
    path = Path(args.json)
    study = results.load_study(path) if path.is_file() else skeleton(path)
    record = {"label": f"SIG{args.signal}", "params": {"check.signal": f"SIG{args.signal}",
                                                       "train.epochs": config.train.epochs,
                                                       "train.batch_size": config.train.batch_size,
                                                       "train.checkpoint_every": every,
                                                       "check.params": str(args.params.resolve().relative_to(ROOT))},
              "figures": figures, "note": f"{stop['stop_line'].split(': ', 1)[-1]} / {resumed_line.split(': ', 1)[-1]}",
              "machine": machine(torch.device("cpu")), "commit": code_version(), "measured": date.today().isoformat(),
              "source": "scripts/preemption_check.py"}
    results.write_text(path, results.dump_study(results.merge_records(study, [record])))
    results.write_all(ROOT)
    return 0


def skeleton(path: Path) -> dict[str, Any]:
    return {
        "study": path.stem,
        "title": "A preempted distill: what a signal saves",
        "description": "`python scripts/preemption_check.py`: the demo's distill (params.yaml), sent a signal from "
                       "outside half an epoch after its first epoch's checkpoint, then run again with the same "
                       "command; the resumed student against the uninterrupted demo student (`make demo`).",
        "columns": [{"header": "signal", "field": "label"},
                    {"header": "exit code", "figure": "exit_code"},
                    {"header": "s from signal to exit", "figure": "seconds_signal_to_exit"},
                    {"header": "step saved", "figure": "step_reached"},
                    {"header": "kill -9 would keep step", "figure": "last_periodic_step"},
                    {"header": "steps lost by kill -9", "figure": "steps_lost_kill"},
                    {"header": "steps lost by the signal", "figure": "steps_lost_signal"},
                    {"header": "resumed vs uninterrupted: largest weight difference", "figure":
                     "largest_weight_difference"},
                    {"header": "measured", "field": "measured"}],
        "units": {"exit_code": "the process's exit code (128 + signal)",
                  "seconds_signal_to_exit": "s from the signal to the process's exit (the step, the checkpoint)",
                  "step_reached": "optimisation steps the checkpoint holds (global_step)",
                  "last_periodic_step": "the step of the last checkpoint a kill -9 would have left",
                  "steps_lost_kill": "steps a kill -9 at that moment would have lost",
                  "steps_lost_signal": "steps lost with the signal",
                  "steps_per_epoch": "steps per epoch",
                  "largest_weight_difference": "largest absolute difference of any weight, resumed vs uninterrupted"},
        "records": [],
        "notes": ["The demo params write a checkpoint at each epoch's end only (`checkpoint_every: 0`), so a kill "
                  "loses the epoch so far; the ImageNet params checkpoint every 1,000 steps. The signal's checkpoint "
                  "holds the step in progress when the signal came, so nothing is lost whatever the period."],
    }


if __name__ == "__main__":
    sys.exit(main())
