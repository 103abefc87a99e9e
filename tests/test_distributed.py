"""Both stages under torchrun with 2 processes on CPU (gloo): equal results, resume after kill -9
(`CSM_DISTILL_FAULT`: every process kills itself at the same point, see pipeline.faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.student import load_student
from stages import precompute
from tests.conftest import ROOT, make_demo_shards, precompute_config
from tests.test_precompute import assert_same_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "pipeline"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    """torchrun over `args`; with `fault`, every process kills itself there (CSM_DISTILL_FAULT)."""
    env = {**ENV, "CSM_DISTILL_FAULT": fault} if fault else ENV
    return subprocess.run(TORCHRUN + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_killed(result: subprocess.CompletedProcess, fault: str) -> None:
    """Both workers died by SIGKILL at `fault`, and torchrun reported it."""
    assert result.returncode != 0, result.stderr[-3000:]
    assert result.stderr.count(f"CSM_DISTILL_FAULT={fault}: killing process") == 2, result.stderr[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_precompute_killed_and_resumed_equals_one_process(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=96, val=4, max_per_shard=8)  # 12 shards
    config, weights = tiny_teacher
    single = tmp_path / "single" / "teacher.h5"
    precompute.run(precompute_config(shards, single, tiny_teacher, views=4))

    out = tmp_path / "two" / "teacher.h5"
    args = ["precompute", "--shards", str(shards), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
            "--teacher-config", str(config), "--teacher-checkpoint", str(weights), "--workers", "0",
            "--views", "4", "--batch-size", "64"]
    killed = run(args, fault="kill-after-shard:2")
    assert_killed(killed, "kill-after-shard:2")
    # rank 0 encodes shards 0, 2, 4, ...; rank 1 shards 1, 3, 5, ...: each wrote its first two
    parts = sorted(p.name for p in (out.parent / "teacher.h5.parts").glob("part-*"))
    assert parts == [f"part-{shard:06d}.h5" for shard in range(4)] and not out.exists()

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 of 12 shards already done" in resumed.stderr
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


@pytest.mark.slow
def test_two_process_distill_learns_and_writes_a_loadable_student(demo_shards, demo_cache, tiny_teacher, tmp_path):
    result = run(distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path, epochs=3))
    assert result.returncode == 0, result.stderr
    assert "2 processes (gloo): global batch 16 = 8 x 2, 6 steps per epoch" in result.stderr
    rows = [r.split(",") for r in (tmp_path / "distill.csv").read_text().splitlines()]
    assert rows[0][:3] == ["epoch", "loss", "agreement"] and len(rows) == 4
    assert float(rows[3][1]) < 0.8 * float(rows[1][1])  # the loss, summed over both processes, goes down
    # the student written is the trained model of rank 0's last checkpoint, after 3 x 6 steps
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    model, checkpoint = load_student(tmp_path / "student.pt")
    assert last["global_step"] == 18 and checkpoint["state_dict"].keys() == last["model"].keys()
    assert all(torch.equal(checkpoint["state_dict"][name], value) for name, value in last["model"].items())
    embeddings = model(torch.rand(2, 3, 32, 32))
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_killed_or_signalled_two_process_distill_resumes_to_the_same_weights(demo_shards, demo_cache, tiny_teacher,
                                                                            tmp_path):
    killed = distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path / "killed", checkpoint_every=2)
    checkpoint = tmp_path / "killed" / "run" / "last.pt"
    # 2 epochs x 6 steps of 8 x 2 images; killed right after step 4, mid-epoch, and its checkpoint
    assert_killed(run(killed, fault="kill-after-step:4"), "kill-after-step:4")
    state = torch.load(checkpoint, weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 0, 4)
    assert not (tmp_path / "killed" / "student.pt").exists()

    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming distill at epoch 1, step 4" in resumed.stderr

    # SIGTERM to rank 1 only, while step 2 runs: rank 1 votes at step 2, both ranks read the vote at
    # step 3 and stop after it; rank 0 writes step 3 (newer than the periodic checkpoint of step 2),
    # both exit with 128 + 15 and no rank waits in a collective.
    signalled = distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path / "signalled", checkpoint_every=2)
    checkpoint = tmp_path / "signalled" / "run" / "last.pt"
    stopped = run(signalled, fault="sigterm-at-step:2")
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert stopped.stderr.count("sigterm-at-step:2: sending SIGTERM") == 1, stopped.stderr[-3000:]
    assert stopped.stderr.count(f"stopped by SIGTERM at epoch 1, step 3 (checkpoint {checkpoint}); run the same "
                                f"command to resume") == 1, stopped.stderr[-3000:]
    # torchrun reports the first rank to exit (143); the other, already past the checkpoint, exits too
    assert "exitcode  : 143" in stopped.stderr, stopped.stderr[-3000:]
    state = torch.load(checkpoint, weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    resumed = run(signalled)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming distill at epoch 1, step 3" in resumed.stderr

    clean = run(distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path / "clean", checkpoint_every=2))
    assert clean.returncode == 0, clean.stderr
    b = torch.load(tmp_path / "clean" / "student.pt", weights_only=True)["state_dict"]
    for interrupted in ("killed", "signalled"):
        a = torch.load(tmp_path / interrupted / "student.pt", weights_only=True)["state_dict"]
        for name in a:
            assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), (interrupted, name)
    # the interrupted epoch's loss: rank 0's checkpoint carried both processes' sums
    rows = {name: [r.split(",")[:4] for r in (tmp_path / name / "distill.csv").read_text().splitlines()[1:]]
            for name in ("killed", "signalled", "clean")}
    for interrupted in ("killed", "signalled"):
        for row, clean_row in zip(rows[interrupted], rows["clean"], strict=True):
            assert [float(v) for v in row] == pytest.approx([float(v) for v in clean_row], abs=2e-6), interrupted


@pytest.fixture(scope="module")
def demo_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out


def test_a_collective_waits_its_timeout_then_fails_instead_of_hanging(tmp_path):
    """distributed.start's timeout reaches the process group: rank 1 stalls (a dead file system
    read), rank 0's barrier gives up after 3 s, not after the 12-hour precompute default."""
    program = tmp_path / "stall.py"
    program.write_text(
        "import datetime, os, time\n"
        "from pipeline import distributed\n"
        "distributed.start(timeout=datetime.timedelta(seconds=3))\n"
        "if os.environ['RANK'] == '1':\n"
        "    time.sleep(60)\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    distributed.barrier()\n"
        "except Exception as err:\n"
        "    print(f'gave up after {time.monotonic() - started:.0f} s: {type(err).__name__}', flush=True)\n"
        "    os._exit(3)\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(program)], cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    seconds = int(result.stdout.split("gave up after ")[1].split(" s")[0])
    assert 2 <= seconds <= 20, result.stdout


def test_torchrun_passes_a_sigusr1_to_its_workers_which_stop_together_with_a_checkpoint(demo_shards, demo_cache,
                                                                                        tiny_teacher, tmp_path):
    """The SLURM route of docs/faults.md: the signal reaches torchrun, which passes it on to every
    worker (`--signals-to-handle`) and gives them `--shutdown-timeout` seconds before SIGKILL."""
    args = distill_args(demo_shards, demo_cache, tiny_teacher, tmp_path / "run", epochs=40, checkpoint_every=2)
    checkpoint = tmp_path / "run" / "run" / "last.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1", "--shutdown-timeout", "120", "-m", "pipeline", *args]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as stderr:
        job = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # training has begun: the periodic checkpoint of step 2 is there
        job.send_signal(signal.SIGUSR1)
        code = job.wait(timeout=300)
    output = log.read_text()
    assert code != 0, output[-3000:]
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] > 2 and state["epoch"] < 40, output[-3000:]  # stopped, at a step after the signal
    line = (f"stopped by SIGUSR1 at epoch {state['epoch'] + 1}, step {state['step_in_epoch']} (checkpoint "
            f"{checkpoint}); run the same command to resume")
    assert output.count(line) == 1, output[-3000:]
    assert not (tmp_path / "run" / "student.pt").exists()
