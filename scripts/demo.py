"""`make demo`: `dvc repro` stage by stage, with an overall line before and after each stage.

Runs `dvc repro --single-item STAGE` for every stage of dvc.yaml in order (DVC still skips a
stage whose inputs did not change), and prints, e.g.

    == demo 3/5: distill (elapsed 0m41s; about 5m10s left at this machine's pace) ==

The estimate scales the typical stage times of a fresh `make demo` on the 2-core CPU this
project is built on (STAGE_SECONDS) by how this run has gone so far; stages that DVC skips
take no time. Then prints the probe table (`python -m pipeline report`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Measured on a fresh clone (2-core CPU): seconds of each stage of the default demo.
STAGE_SECONDS = {"shards": 10, "precompute": 25, "distill": 198, "supervised": 190, "probe": 30}


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def main() -> int:
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    started = time.perf_counter()
    pace = 1.0  # this machine's seconds per measured second, from the stages that ran
    expected_done = 0.0
    for number, stage in enumerate(stages, start=1):
        left = sum(STAGE_SECONDS.get(s, 0) for s in stages[number - 1:]) * pace
        print(f"== demo {number}/{len(stages)}: {stage} (elapsed {clock(time.perf_counter() - started)}; "
              f"about {clock(left)} left at this machine's pace) ==", flush=True)
        stage_started = time.perf_counter()
        result = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=ROOT)
        if result.returncode != 0:
            print(f"== demo stopped: stage {stage} failed (exit code {result.returncode}) ==", flush=True)
            return result.returncode
        took = time.perf_counter() - stage_started
        if took > 0.5 * STAGE_SECONDS.get(stage, 0) > 0:  # it ran (a skipped stage takes a second or two)
            expected_done += STAGE_SECONDS[stage]
            # damped: one short stage that ran slow (or fast) does not swing the estimate
            pace = max(0.2, (time.perf_counter() - started + 60) / (expected_done + 60))
        print(f"== demo {number}/{len(stages)}: {stage} done in {clock(took)} ==", flush=True)
    print(f"== demo: all stages done in {clock(time.perf_counter() - started)} ==", flush=True)
    return subprocess.run([sys.executable, "-m", "pipeline", "report"], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
