"""Stage two: the CSM loss by hand, learning on the demo, exact resume, refused caches."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from pipeline import training
from pipeline.cache import TeacherCache
from pipeline.errors import PipelineError
from pipeline.features import extract_features
from pipeline.losses import csm_loss, embedding_loss
from pipeline.shards import MixedBatches, iter_shard, iterate_batches, list_shards
from pipeline.student import load_student
from pipeline.teacher import load_teacher
from pipeline.training import ReplayViews, epoch_view
from pipeline.views import apply_view
from stages import distill, precompute
from stages.probe import random_init_like
from tests.conftest import ROOT, make_tiny_teacher, precompute_config, run_with_fault, stage_config


def test_csm_loss_matches_a_hand_computation():
    s_teacher = torch.tensor([[0.3, 0.1, -0.2]])
    anchors = torch.eye(3)
    z_student = torch.tensor([[0.6, 0.8, 0.0]])  # unit norm: cosines to the anchors are 0.6, 0.8, 0
    tau_t, tau_s = 0.1, 0.5
    e_t = [math.exp(v / tau_t) for v in (0.3, 0.1, -0.2)]
    p_t = [v / sum(e_t) for v in e_t]
    e_s = [math.exp(v / tau_s) for v in (0.6, 0.8, 0.0)]
    p_s = [v / sum(e_s) for v in e_s]
    expected = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    terms = csm_loss(s_teacher, z_student, anchors, tau_t, tau_s)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["agreement"].item() == 0.0  # teacher argmax is anchor 0, student's is anchor 1


def test_csm_loss_is_zero_when_student_matches_and_handles_topk():
    torch.manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    s = z @ anchors.T
    assert csm_loss(s, z, anchors, 0.07, 0.07)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    truncated = s.clone()
    truncated[:, 0] = float("-inf")  # an anchor a top-k cache left out
    loss = csm_loss(truncated, z, anchors, 0.07, 0.07)["loss"]
    # by hand: p_T is the softmax over anchors 1..3 only; p_S keeps all four
    p_t = torch.softmax(s[:, 1:] / 0.07, dim=-1)
    log_p_s = torch.log_softmax(s / 0.07, dim=-1)[:, 1:]
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6) and loss.item() > 0
    # = -log(1 - p_S(anchor 0)) per row: the mass the student puts where the teacher has none
    p_s0 = torch.softmax(s / 0.07, dim=-1)[:, 0]
    assert loss.item() == pytest.approx((-torch.log1p(-p_s0)).mean().item(), rel=1e-4, abs=1e-6)


def test_embedding_loss_is_one_minus_cosine():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    student = torch.tensor([[0.6, 0.8], [0.0, -1.0]])  # cosines 0.6 and -1
    terms = embedding_loss(teacher, student)
    assert terms["loss"].item() == pytest.approx(((1 - 0.6) + (1 + 1)) / 2)
    assert terms["cosine"].item() == pytest.approx((0.6 - 1) / 2)


@pytest.fixture(scope="module")
def demo_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out


def distill_config(shards, cache, teacher, out_dir, **changes):
    config, weights = teacher
    settings = {"out": str(out_dir / "student.pt"), "run_dir": str(out_dir / "run"),
                "metrics": str(out_dir / "distill.json"), "plot": str(out_dir / "distill.csv"),
                "train.shards": str(shards), "train.cache": str(cache), "train.image_size": 32,
                "train.batch_size": 16, "train.epochs": 3, "train.workers": 0, "train.lr": 0.002,
                "train.warmup_epochs": 0.0, "teacher.config": str(config), "teacher.checkpoint": str(weights)}
    settings.update(changes)
    return stage_config("distill", **settings)


def test_a_few_epochs_lower_the_loss_and_raise_agreement(demo_shards, demo_cache, tiny_teacher, tmp_path):
    config = distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path)
    metrics = distill.run(config)
    rows = (tmp_path / "distill.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,agreement,lr,images_per_second" and len(rows) == 4
    first, last = (dict(zip(rows[0].split(","), map(float, r.split(",")), strict=True)) for r in (rows[1], rows[3]))
    assert last["loss"] < 0.7 * first["loss"]
    assert last["agreement"] > first["agreement"]
    # the CSV rounds to 6 decimals (write_history_csv)
    assert metrics["epochs"] == 3 and metrics["final_loss"] == pytest.approx(last["loss"], abs=1e-6)
    # on the val images, never trained on: the saved student matches the teacher's distribution over
    # the anchors far better than the same architecture at its initialisation (same seed)
    model, checkpoint = load_student(tmp_path / "student.pt")
    teacher = load_teacher(precompute_config(demo_shards, demo_cache, tiny_teacher).teacher, "cpu")
    val = {"teacher": (teacher.image_size, teacher.encode_image), "student": (32, model.eval()),
           "random_init": (32, random_init_like(checkpoint).eval())}
    with torch.no_grad():
        features, _, _ = extract_features(list_shards(demo_shards, "val"), val, 64, 0)
    anchors = TeacherCache(demo_cache).anchors()
    targets = features["teacher"] @ anchors.T  # the teacher's similarities, as precompute stores them
    held_out = {name: csm_loss(targets, features[name], anchors, config.tau_teacher, config.tau_student)["loss"].item()
                for name in ("student", "random_init")}  # measured here: 0.043 and 0.366
    assert held_out["student"] < 0.25 * held_out["random_init"] and held_out["student"] < first["loss"], held_out
    assert torch.allclose(features["student"].norm(dim=-1), torch.ones(48), atol=1e-5)


@pytest.mark.slow
def test_runs_killed_or_signalled_mid_epoch_and_at_an_epoch_end_resume_to_the_same_weights(
        demo_shards, demo_cache, tiny_teacher, tmp_path):
    config, weights = tiny_teacher
    args = [sys.executable, "-m", "pipeline", "distill", "--shards", str(demo_shards), "--cache", str(demo_cache),
            "--image-size", "32", "--batch-size", "16", "--epochs", "2", "--workers", "1",
            "--checkpoint-every", "2", "--teacher-config", str(config), "--teacher-checkpoint", str(weights)]

    def outputs(name):
        d = tmp_path / name
        return ["--out", str(d / "student.pt"), "--run-dir", str(d / "run"), "--metrics", str(d / "m.json"),
                "--plot", str(d / "p.csv")]

    def run(name, fault=""):
        if fault:  # the process kills itself there (pipeline.faults)
            return run_with_fault(args + outputs(name), fault, tmp_path / f"{fault}.log")
        return subprocess.run(args + outputs(name), cwd=ROOT, capture_output=True, text=True, timeout=300)

    checkpoint, lock = tmp_path / "killed" / "run" / "last.pt", tmp_path / "killed" / "run.lock"
    # 2 epochs x 6 steps. Step 5 is taken, not saved: last.pt holds step 4 (--checkpoint-every 2).
    first = run("killed", "kill-after-step:5")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    state = torch.load(checkpoint, weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 0, 4)
    assert not (tmp_path / "killed" / "student.pt").exists() and not (tmp_path / "killed" / "p.csv").exists()
    dead = json.loads(lock.read_text())["pid"]  # the lock of the killed run stays behind
    # Resumed, then killed after step 6, the end of epoch 1: last.pt is the epoch's own checkpoint.
    second = run("killed", "kill-after-step:6")
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert "resuming distill at epoch 1, step 4" in second.stderr
    assert f"taking over a stale lock of process {dead} " in second.stderr
    state = torch.load(checkpoint, weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (6, 1, 0)
    assert len(json.loads(state["history"])) == 1

    resumed = run("killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming distill at epoch 2, step 0" in resumed.stderr and "taking over a stale lock" in resumed.stderr
    assert not lock.exists()

    # SIGTERM while step 3 runs (pipeline.preemption): the step is finished and saved, a checkpoint
    # newer than the periodic one of step 2; one line, exit code 128 + 15, the lock released.
    signalled = run("signalled", "sigterm-at-step:3")
    assert signalled.returncode == 128 + signal.SIGTERM, signalled.stderr[-2000:]
    checkpoint = tmp_path / "signalled" / "run" / "last.pt"
    stops = [line for line in signalled.stderr.splitlines() if "stopped by" in line]
    assert stops == [f"WARNING pipeline.training: stopped by SIGTERM at epoch 1, step 3 (checkpoint {checkpoint}); "
                     f"run the same command to resume"]
    state = torch.load(checkpoint, weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    assert not (tmp_path / "signalled" / "run.lock").exists()
    assert not (tmp_path / "signalled" / "student.pt").exists()
    resumed = run("signalled")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming distill at epoch 1, step 3" in resumed.stderr

    clean = run("clean")
    assert clean.returncode == 0, clean.stderr
    b = torch.load(tmp_path / "clean" / "student.pt", weights_only=True)["state_dict"]
    for interrupted in ("killed", "signalled"):
        a = torch.load(tmp_path / interrupted / "student.pt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (interrupted, name)
    # every epoch's loss, agreement and lr, the interrupted epoch's sums carried over in last.pt
    rows = {name: [r.split(",")[:4] for r in (tmp_path / name / "p.csv").read_text().splitlines()]
            for name in ("killed", "signalled", "clean")}
    assert len(rows["clean"]) == 3 and rows["killed"] == rows["clean"] and rows["signalled"] == rows["clean"]


def test_mismatched_caches_are_refused(demo_shards, demo_cache, tiny_teacher, tmp_path):
    other_teacher = make_tiny_teacher(tmp_path / "other", seed=9)
    with pytest.raises(PipelineError, match=r"made by another teacher than the params. \(weights sha256: cache "):
        distill.run(distill_config(demo_shards, demo_cache, other_teacher, tmp_path))
    with pytest.raises(PipelineError, match="anchor digest.*plain prompts"):
        distill.run(distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path, **{"prompts.set": "plain"}))
    old = tmp_path / "old.h5"
    shutil.copy(demo_cache, old)
    with h5py.File(old, "a") as f:
        f.attrs["format_version"] = 0
    with pytest.raises(PipelineError, match="format version 0"):
        distill.run(distill_config(demo_shards, old, tiny_teacher, tmp_path))
    assert not (tmp_path / "student.pt").exists()


def test_embedding_distillation_learns_the_teacher_embeddings(demo_shards, demo_cache, tiny_teacher, tmp_path):
    with pytest.raises(PipelineError, match="--store-embeddings"):
        distill.run(distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path, loss="embedding"))
    cache = tmp_path / "with-embeddings.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher, store_embeddings=True))
    results = {}
    for loss in ("embedding", "both"):
        out = tmp_path / loss
        distill.run(distill_config(demo_shards, cache, tiny_teacher, out, loss=loss))
        rows = [r.split(",") for r in (out / "distill.csv").read_text().splitlines()[1:]]
        results[loss] = [float(r[1]) for r in rows]
    # embedding: loss = 1 - mean cosine, which must fall; both: CSM + embedding terms
    assert results["embedding"][-1] < 0.7 * results["embedding"][0]
    assert 0 <= results["embedding"][-1] < 1
    assert results["both"][-1] < 0.8 * results["both"][0]


def test_shuffled_batches_pair_each_image_with_its_own_view_and_targets(demo_shards, demo_cache):
    cache = TeacherCache(demo_cache)
    shards = list_shards(demo_shards, "train")
    seed, epoch, views = 3, 1, cache.header.views_per_image
    replay = ReplayViews(cache, seed, epoch, 32, with_targets=True)
    dataset = MixedBatches(shards, 16, replay, replay.context, seed=seed, epoch=epoch)
    with h5py.File(demo_cache, "r") as f:
        row_of_key = {k.decode(): i for i, k in enumerate(f["images/key"][:])}
        similarities = f["views/similarities"][:].astype(np.float32)
        params = f["views/params"][:]
        view_image = f["views/image"][:]
    images = {s.key: s.image for index, path in enumerate(shards) for s in iter_shard(path, index)}
    positions: dict[int, list[int]] = {}
    seen = 0
    for batch in iterate_batches(dataset, 0):
        for i, key in enumerate(batch["keys"]):
            shard = int(batch["shards"][i])
            start, count = int(cache.image_start[shard]), int(cache.image_count[shard])
            view = epoch_view(seed, epoch, shard, views)
            image = row_of_key[key]
            row = start * views + view * count + (image - start)  # the layout, spelled out by hand
            assert view_image[row] == image
            assert batch["targets"].dtype == torch.float16  # as stored: widened on the device
            assert torch.equal(batch["targets"][i].float(), torch.from_numpy(similarities[row])), key
            assert torch.equal(batch["pixels"][i], apply_view(images[key], params[row], 32)), key
            positions.setdefault(shard, []).append(int(batch["positions"][i]))
            seen += 1
    assert seen == cache.num_images
    assert all(p != sorted(p) for p in positions.values())  # every shard's order really is shuffled


def test_batches_mix_shards_in_an_order_fixed_by_seed_and_epoch(demo_shards):
    shards = list_shards(demo_shards, "train")

    def keys(epoch, rank=0, world=1, seed=0):
        dataset = MixedBatches(shards, 16, lambda sample, _: {}, None, seed=seed, epoch=epoch, rank=rank,
                               world=world, mix=4)
        batches = list(iterate_batches(dataset, 0))
        return [b["keys"] for b in batches], [set(b["shards"].tolist()) for b in batches]

    batches, shard_sets = keys(epoch=0)
    flat = [k for b in batches for k in b]
    assert len(flat) == len(set(flat)) == 96  # every image once per epoch
    assert all(len(s) >= 2 for s in shard_sets)  # every batch mixes shards
    assert keys(epoch=0)[0] == batches  # the same (seed, epoch): the same batches
    assert keys(epoch=1)[0] != batches and keys(epoch=0, seed=1)[0] != batches
    rank0 = {k for b in keys(0, rank=0, world=2)[0] for k in b}
    rank1 = {k for b in keys(0, rank=1, world=2)[0] for k in b}
    assert not rank0 & rank1 and rank0 | rank1 == set(flat)  # two processes split the shards


def test_a_shared_memory_budget_above_dev_shm_is_refused(demo_shards, demo_cache, tiny_teacher, tmp_path):
    config = distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path,
                            **{"train.workers": 64, "train.prefetch": 1000, "train.batch_size": 4096,
                               "train.image_size": 512})
    with pytest.raises(PipelineError, match=r"options --workers 64 --prefetch 1000 --batch-size 4096: the "
                                            r"prefetched batches need \d+ MB of shared memory, /dev/shm has \d+ MB "
                                            r"free; lower them"):
        distill.run(config)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_shared_memory_budget_counts_every_process_of_the_machine(demo_shards, demo_cache, tiny_teacher,
                                                                      tmp_path, monkeypatch):
    """torchrun's processes on one machine share its /dev/shm: a budget one process fits in is
    refused when LOCAL_WORLD_SIZE processes would each need it."""
    workers = min(2, len(os.sched_getaffinity(0)))
    config = distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path, **{"train.workers": workers})
    per_process = workers * config.train.prefetch * training.batch_bytes(config.train, TeacherCache(demo_cache),
                                                                          distill.csm_objective(config, 32))
    # twice what it holds: other processes' use of /dev/shm may change while this test runs
    processes = 2 * (shutil.disk_usage("/dev/shm").free // per_process) + 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    with pytest.raises(PipelineError, match=rf"options --workers {workers} --prefetch 2 --batch-size 16: the "
                                            rf"prefetched batches need \d+ MB of shared memory \({processes} "
                                            r"processes on this machine\), /dev/shm has \d+ MB free"):
        distill.run(config)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    distill.run(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=1)))  # fits one process
