"""probe and bench on a many-GPU node: under torchrun they run once, on rank 0, and the probe
refuses a DataLoader budget that /dev/shm cannot hold before its workers start.

torchrun with 2 CPU processes (no process group: neither stage uses a collective); both
commands run with OMP_NUM_THREADS=1, as torchrun starts its processes, so that the one-process
run and rank 0 of the two-process run compute alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from stages import distill, precompute, probe
from tests.conftest import ROOT, precompute_config, stage_config
from tests.test_bench import KEYS

PIPELINE = [sys.executable, "-m", "pipeline"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "pipeline"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def distilled(demo_shards, tiny_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """A teacher cache of the demo shards and a student distilled from it for one epoch."""
    work = tmp_path_factory.mktemp("distilled")
    cache = work / "teacher.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher))
    config, weights = tiny_teacher
    distill.run(stage_config(
        "distill", out=str(work / "student.pt"), run_dir=str(work / "run"), metrics=str(work / "distill.json"),
        plot=str(work / "distill.csv"), **{"train.shards": str(demo_shards), "train.cache": str(cache),
                                           "train.image_size": 32, "train.batch_size": 16, "train.epochs": 1,
                                           "train.workers": 0, "teacher.config": str(config),
                                           "teacher.checkpoint": str(weights)}))
    return cache, work / "student.pt"


def probe_args(demo_shards, distilled, tiny_teacher, out: Path) -> list[str]:
    (cache, student), (config, weights) = distilled, tiny_teacher
    return ["probe", "--shards", str(demo_shards), "--cache", str(cache), "--student", str(student),
            "--supervised", "", "--out", str(out / "probe.json"), "--plots", str(out / "plots"),
            "--distill-csv", "", "--batch-size", "32", "--workers", "1", "--max-train-images", "0",
            "--device", "cpu", "--teacher-config", str(config), "--teacher-checkpoint", str(weights)]


@pytest.mark.slow
def test_two_process_probe_runs_on_rank_0_and_equals_one_process(demo_shards, distilled, tiny_teacher, tmp_path):
    single = run(PIPELINE, probe_args(demo_shards, distilled, tiny_teacher, tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    two = run(TORCHRUN, probe_args(demo_shards, distilled, tiny_teacher, tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "probe runs in one process: rank 1 has nothing to do" in two.stderr
    # the loaders' shared memory was checked before they started (rank 1 logs only warnings)
    assert two.stderr.count("probe data loader: 1 workers x prefetch 2") == 1, two.stderr[-3000:]
    assert two.stdout == single.stdout and single.stdout.count("model ") == 1  # one probe table, the same
    written = json.loads((tmp_path / "two" / "probe.json").read_text())
    assert written == json.loads((tmp_path / "single" / "probe.json").read_text())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["plots", "probe.config.json", "probe.json"]


@pytest.mark.slow
def test_two_process_bench_runs_on_rank_0(demo_shards, distilled, tiny_teacher, tmp_path):
    (cache, _), (config, weights) = distilled, tiny_teacher
    out = tmp_path / "bench" / "bench.json"
    result = run(TORCHRUN, [
        "bench", "--shards", str(demo_shards), "--cache", str(cache), "--image-size", "32", "--batch-size", "16",
        "--steps", "2", "--warmup-steps", "1", "--workers", "1", "--topk", "4", "--views", "2",
        "--precompute-shards", "1", "--device", "cpu", "--json", str(out),
        "--teacher-config", str(config), "--teacher-checkpoint", str(weights)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bench runs in one process: rank 1 has nothing to do" in result.stderr
    assert result.stdout.count("ratios:") == 1  # one bench table
    written = json.loads(out.read_text())
    assert KEYS <= set(written) and written["device"] == "cpu"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.config.json", "bench.json"]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_probe_refuses_a_loader_budget_beyond_shared_memory(demo_shards, distilled, tiny_teacher, tmp_path):
    """10^9 images of 3 x 32 x 32 bytes per batch, 2 prefetched: terabytes, more than any /dev/shm."""
    (cache, student), (config, weights) = distilled, tiny_teacher
    settings = {"shards": str(demo_shards), "cache": str(cache), "student": str(student), "supervised": "",
                "out": str(tmp_path / "probe.json"), "plots": str(tmp_path / "plots"), "batch_size": 10**9,
                "workers": 1, "device": "cpu", "teacher.config": str(config), "teacher.checkpoint": str(weights)}
    with pytest.raises(PipelineError, match=r"^options --workers 1 --batch-size 1000000000: the prefetched "
                                            r"batches need \d+ MB of shared memory, /dev/shm has \d+ MB free; "
                                            r"lower them \(or give the container more, e\.g\. docker --shm-size\)$"):
        probe.run(stage_config("probe", **settings))
    assert not list(tmp_path.iterdir())  # refused before any work
