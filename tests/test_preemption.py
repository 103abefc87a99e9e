"""Stopping on a signal (pipeline.preemption): what the handlers record, DataLoader workers that
outlive a signal to the whole job, and demo-teacher's stop and resume. distill's and precompute's
stops, one process and two, are tested beside their kill -9 resumes (test_distill.py,
test_distributed.py, test_precompute.py)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline import faults, preemption
from pipeline.preemption import Stopped, StopSignals
from pipeline.shards import ShardBatches, iterate_batches, list_shards
from stages import demo_teacher
from tests.conftest import make_tiny_teacher, stage_config


def test_the_first_signal_is_recorded_later_ones_ignored_and_the_handlers_restored():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: ignored
        os.kill(os.getpid(), signal.SIGINT)  # not a KeyboardInterrupt either
        assert signals.received == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
    assert Stopped(signal.SIGTERM).exit_code == 143 and Stopped(signal.SIGINT).exit_code == 130
    assert Stopped(signal.SIGUSR1).exit_code == 138 and str(Stopped(signal.SIGUSR1)) == "stopped by SIGUSR1"


def test_the_vote_of_one_process_is_its_own_signal():
    with StopSignals() as signals:
        vote = preemption.StopVote(signals, torch.device("cpu"))
        assert vote.poll() is None and vote.settle() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert vote.poll() == signal.SIGTERM and vote.settle() == signal.SIGTERM


def test_dataloader_workers_outlive_the_signals_a_scheduler_sends_to_every_process(demo_shards):
    """SLURM and Kubernetes signal every process of the job: the workers must keep serving until
    the main process, which saves the work, stops them."""
    shards = list_shards(demo_shards, "train")

    def prepare(sample, context):
        time.sleep(0.01)  # batches still to come when the signals arrive
        return {"label": torch.tensor(sample.label)}

    keys = []
    others = set(psutil.Process().children())  # processes other tests left running
    for number, batch in enumerate(iterate_batches(ShardBatches(shards, 8, prepare), workers=2), 1):
        keys += batch["keys"]
        if number == 1:
            workers = [p for p in psutil.Process().children() if p not in others]
            assert len(workers) == 2
            for worker in workers:
                for signum in preemption.SIGNALS:
                    worker.send_signal(signum)
    assert len(keys) == 96 and len(set(keys)) == 96
    assert all(worker.is_running() is False or worker.status() == psutil.STATUS_ZOMBIE for worker in workers)


def test_demo_teacher_stops_after_the_step_in_progress_and_resumes_to_the_same_weights(demo_shards, tmp_path,
                                                                                       monkeypatch, caplog):
    config_file, _ = make_tiny_teacher(tmp_path / "arch")

    def config(name):
        return stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file),
                            out=str(tmp_path / name / "teacher.safetensors"), arch="two-tower", init="", steps=4,
                            batch_size=8, warmup_steps=1, workers=0, eval_every=0)

    stopped = config("stopped")
    resume_path = tmp_path / "stopped" / "teacher.safetensors.resume.pt"
    monkeypatch.setenv(faults.VARIABLE, "sigterm-at-step:2")
    faults.planned.cache_clear()
    try:
        with pytest.raises(Stopped) as stop:
            demo_teacher.run(stopped)
    finally:
        monkeypatch.delenv(faults.VARIABLE)
        faults.planned.cache_clear()
    assert stop.value.signum == signal.SIGTERM
    assert f"stopped by SIGTERM at step 2 of 4 (checkpoint {resume_path}); run the same command to resume" \
        in caplog.text
    assert torch.load(resume_path, weights_only=True)["step"] == 2
    # a stopped job ignores the signals until it exits; this test process takes its handlers back
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in preemption.SIGNALS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    demo_teacher.run(stopped)  # resumes at step 2
    assert not resume_path.exists()
    demo_teacher.run(config("clean"))
    a = load_file(tmp_path / "stopped" / "teacher.safetensors")
    b = load_file(tmp_path / "clean" / "teacher.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
