"""Both stages under torchrun with 2 processes on CPU (gloo): equal results, resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from pipeline.student import load_student
from stages import precompute
from tests.conftest import ROOT, make_demo_shards, precompute_config
from tests.test_precompute import assert_same_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "pipeline"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(TORCHRUN + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def kill_when(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not ready() and process.poll() is None:
        time.sleep(0.02)
    # kill -9 torchrun and its workers at once, as a preempted machine would
    tree = psutil.Process(process.pid).children(recursive=True)
    for worker in [psutil.Process(process.pid), *tree]:
        worker.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run must be killed {what}"


def test_two_process_precompute_killed_and_resumed_equals_one_process(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=240, val=4, max_per_shard=8)  # 30 shards
    config, weights = tiny_teacher
    single = tmp_path / "single" / "teacher.h5"
    precompute.run(precompute_config(shards, single, tiny_teacher, views=4))

    out = tmp_path / "two" / "teacher.h5"
    args = ["precompute", "--shards", str(shards), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
            "--teacher-config", str(config), "--teacher-checkpoint", str(weights), "--workers", "0",
            "--views", "4", "--batch-size", "64"]
    parts = out.parent / "teacher.h5.parts"
    process = start(args)
    kill_when(process, lambda: len(list(parts.glob("part-*.h5"))) >= 4, "between its first and last shard")
    done = len(list(parts.glob("part-*.h5")))
    assert 4 <= done < 30 and not out.exists()

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 30 shards already done" in resumed.stderr
    assert_same_file(single, out)  # every dataset and attribute, whatever the number of processes


def distill_args(shards, cache, teacher, out_dir, epochs=2, **options) -> list[str]:
    config, weights = teacher
    args = ["distill", "--shards", str(shards), "--cache", str(cache), "--image-size", "32",
            "--batch-size", "8", "--epochs", str(epochs), "--workers", "0", "--lr", "0.002",
            "--warmup-epochs", "0", "--teacher-config", str(config), "--teacher-checkpoint", str(weights),
            "--out", str(out_dir / "student.pt"), "--run-dir", str(out_dir / "run"),
            "--metrics", str(out_dir / "distill.json"), "--plot", str(out_dir / "distill.csv")]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def test_two_process_distill_learns_and_writes_a_loadable_student(demo_shards, demo_cache, tiny_teacher, tmp_path):
    result = run(distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path, epochs=3))
    assert result.returncode == 0, result.stderr
    assert "2 processes (gloo): global batch 16 = 8 x 2, 6 steps per epoch" in result.stderr
    rows = [r.split(",") for r in (tmp_path / "distill.csv").read_text().splitlines()]
    assert rows[0][:3] == ["epoch", "loss", "agreement"] and len(rows) == 4
    assert float(rows[3][1]) < 0.8 * float(rows[1][1])  # the loss, summed over both processes, goes down
    model, checkpoint = load_student(tmp_path / "student.pt")
    embeddings = model(torch.rand(2, 3, 32, 32))
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["global_step"] == 18


def test_killed_two_process_distill_resumes_to_the_same_weights(demo_shards, demo_cache, tiny_teacher, tmp_path):
    killed = distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path / "killed", checkpoint_every=2)
    checkpoint = tmp_path / "killed" / "run" / "last.pt"
    process = start(killed)
    kill_when(process, checkpoint.exists, "before it ends")
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 12 and not (tmp_path / "killed" / "student.pt").exists()

    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming distill" in resumed.stderr
    clean = run(distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path / "clean", checkpoint_every=2))
    assert clean.returncode == 0, clean.stderr
    a = torch.load(tmp_path / "killed" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "clean" / "student.pt", weights_only=True)["state_dict"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name


@pytest.fixture(scope="module")
def demo_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out
