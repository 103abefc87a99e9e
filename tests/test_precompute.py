"""Stage one: replayable, deterministic, resumable after kill -9, top-k bounded, corrupt-tolerant."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline import cache
from pipeline.errors import PipelineError
from pipeline.shards import iter_shard, list_shards
from pipeline.teacher import load_teacher
from pipeline.views import apply_view
from stages import inspect as inspect_stage
from stages import precompute
from tests.conftest import ROOT, make_demo_shards, precompute_config, run_with_fault


@pytest.fixture(scope="module")
def full_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher.h5"
    metrics = precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out, metrics


def datasets(path):
    """Every dataset of an HDF5 file by name, and the root attributes."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return found, attrs


def assert_same_file(a, b):
    data_a, attrs_a = datasets(a)
    data_b, attrs_b = datasets(b)
    assert attrs_a == attrs_b
    assert sorted(data_a) == sorted(data_b)
    for name in data_a:
        assert np.array_equal(data_a[name], data_b[name]), name


def test_layout_counts_and_metrics(full_cache, demo_shards):
    out, metrics = full_cache
    reader = cache.TeacherCache(out)
    assert reader.num_images == 96 and metrics["images"] == 96 and metrics["views"] == 384
    assert reader.shard_names == [p.name for p in list_shards(demo_shards, "train")]
    assert list(reader.image_count) == [32, 32, 32]
    f = reader.file
    assert f["views/similarities"].shape == (384, 48) and f["views/similarities"].dtype == np.float16
    assert f["views/params"].shape == (384, 5)
    # view-major within each shard: shard s's rows are its 32 images for view 0, then view 1...
    expected = np.concatenate([np.tile(np.arange(32 * s, 32 * (s + 1)), 4) for s in range(3)])
    assert np.array_equal(f["views/image"][:], expected)
    assert f["views/similarities"].is_virtual and f["views/params"].is_virtual
    anchors = f["anchors/embeddings"][:]
    assert np.allclose(np.linalg.norm(anchors, axis=1), 1, atol=1e-5)
    parts = sorted((out.parent / "teacher.h5.parts").glob("part-*.h5"))
    stored = out.stat().st_size + sum(p.stat().st_size for p in parts)
    assert len(parts) == 3
    assert {k: metrics[k] for k in ("skipped", "skipped_keys", "images_this_run", "file_bytes", "bytes_per_view",
                                    "topk", "device")} == \
        {"skipped": 0, "skipped_keys": [], "images_this_run": 96, "file_bytes": stored,
         "bytes_per_view": round(stored / 384, 1), "topk": 0, "device": "cpu"}
    assert metrics["views_per_second"] == pytest.approx(4 * metrics["images_per_second"], abs=0.5)
    params = f["views/params"][:]
    assert len(np.unique(params[:, :4], axis=0)) > 300  # views differ
    assert 0.3 < params[:, 4].mean() < 0.7  # flips happen about half the time


def test_replay_teacher_on_stored_views(full_cache, demo_shards, tiny_teacher):
    out, _ = full_cache
    reader = cache.TeacherCache(out)
    config, weights = tiny_teacher
    teacher = load_teacher(precompute_config(demo_shards, out, tiny_teacher).teacher, "cpu")
    anchors = reader.anchors()
    shards = list_shards(demo_shards, "train")
    shard = 1
    targets = reader.shard_targets(shard)
    samples = {s.position: s for s in iter_shard(shards[shard], shard)}
    for row in (0, 7, 31):
        sample = samples[int(targets.positions[row])]
        assert sample.key == reader.file["images/key"][32 + row].decode()
        views = torch.stack([apply_view(sample.image, p, teacher.image_size) for p in targets.params[row]])
        expected = teacher.encode_image(views) @ anchors.T
        assert torch.allclose(torch.from_numpy(targets.similarities[row]), expected, atol=2e-3)


def test_same_settings_give_identical_files(full_cache, demo_shards, tiny_teacher, tmp_path):
    again = tmp_path / "again.h5"
    precompute.run(precompute_config(demo_shards, again, tiny_teacher, workers=2))
    assert_same_file(full_cache[0], again)
    other_seed = tmp_path / "seed.h5"
    precompute.run(precompute_config(demo_shards, other_seed, tiny_teacher, seed=5))
    with h5py.File(full_cache[0]) as a, h5py.File(other_seed) as b:
        assert not np.array_equal(a["views/params"][:], b["views/params"][:])


def test_topk_reconstruction_error_bound(full_cache, demo_shards, tiny_teacher, tmp_path):
    out, _ = full_cache
    k = 5
    topk_out = tmp_path / "topk.h5"
    metrics = precompute.run(precompute_config(demo_shards, topk_out, tiny_teacher, topk=k))
    full, compressed = cache.TeacherCache(out), cache.TeacherCache(topk_out)
    assert compressed.file["views/topk_index"].shape == (384, k)
    assert metrics["bytes_per_view"] < json.loads((out.parent / "precompute.json").read_text()
                                                   )["bytes_per_view"]
    s_full = torch.from_numpy(full.similarities(slice(None)))
    s_topk = torch.from_numpy(compressed.similarities(slice(None)))
    assert (torch.isfinite(s_topk).sum(-1) == k).all()
    for tau in (0.02, 0.1):
        p_full = torch.softmax(s_full / tau, -1)
        p_topk = torch.softmax(s_topk / tau, -1)
        tv = 0.5 * (p_full - p_topk).abs().sum(-1)
        bound = cache.topk_mass_outside(s_full, k, tau)
        assert (tv <= bound + 1e-4).all()
        # the rule is exact truncation: TV equals the mass outside the top-k
        assert torch.allclose(tv, bound, atol=1e-4)


def test_corrupt_sample_is_skipped_and_listed(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=20, val=4, max_per_shard=10)
    first = list_shards(shards, "train")[0]
    samples = list(wds.tariterators.tarfile_samples([{"url": str(first)}]))
    with wds.TarWriter(str(first)) as writer:
        for i, sample in enumerate(samples):
            writer.write({"__key__": sample["__key__"], "cls": sample["cls"],
                          "jpg": b"\xff\xd8 broken" if i == 3 else sample["jpg"]})
    (shards / "manifest.json").unlink()  # the shard changed: its listed sha256 no longer applies
    out = tmp_path / "cache.h5"
    metrics = precompute.run(precompute_config(shards, out, tiny_teacher))
    assert metrics["skipped"] == 1 and metrics["skipped_keys"] == [samples[3]["__key__"]]
    assert cache.TeacherCache(out).num_images == 19


def test_unreadable_shard_is_a_one_line_error(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=20, val=4, max_per_shard=10)
    broken = list_shards(shards, "train")[1]
    broken.write_bytes(broken.read_bytes()[:700])
    (shards / "manifest.json").unlink()
    with pytest.raises(PipelineError, match="train-000001.tar"):
        precompute.run(precompute_config(shards, tmp_path / "cache.h5", tiny_teacher))
    assert not (tmp_path / "cache.h5").exists()


def test_changed_shards_since_partial_run_are_refused(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=20, val=4, max_per_shard=10)
    out = tmp_path / "cache.h5"
    config = precompute_config(shards, out, tiny_teacher)
    cache.write_state(out, {"header": {"shard_digest": "something else"}, "shards": []})
    with pytest.raises(PipelineError, match="shards changed"):
        precompute.run(config)


def test_inspect_summary(full_cache):
    info = inspect_stage.summary(full_cache[0], tau_teacher=0.02)
    assert info["images"] == 96 and info["views"] == 384 and info["anchors"] == 48
    assert info["bytes"] == full_cache[1]["file_bytes"] and info["sampled_views"] == 96
    # recomputed from the raw datasets: shard s's 32 rows of view s mod 4 (view-major within a shard)
    with h5py.File(full_cache[0]) as f:
        rows = np.concatenate([32 * 4 * s + 32 * (s % 4) + np.arange(32) for s in range(3)])
        similarities = torch.from_numpy(f["views/similarities"][:][rows].astype(np.float32))
        labels = f["images/label"][:][f["views/image"][:][rows]]
        argmax_class = f["anchors/class"][:][similarities.argmax(-1).numpy()]
    p = torch.softmax(similarities / 0.02, dim=-1)
    assert info["mean_max_probability"] == pytest.approx(p.max(-1).values.mean().item(), rel=1e-6)
    assert info["mean_entropy"] == pytest.approx(-(p * p.clamp_min(1e-30).log()).sum(-1).mean().item(), abs=1e-5)
    assert info["max_entropy"] == pytest.approx(np.log(48))
    assert info["teacher_label_agreement"] == pytest.approx((argmax_class == labels).mean())


@pytest.mark.slow
def test_resume_after_kill_or_signal_gives_the_same_file(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=96, val=4, max_per_shard=8)  # 12 shards
    config, weights = tiny_teacher
    out = tmp_path / "killed" / "teacher.h5"
    args = [sys.executable, "-m", "pipeline", "precompute", "--shards", str(shards), "--out", str(out),
            "--metrics", str(tmp_path / "m.json"), "--teacher-config", str(config),
            "--teacher-checkpoint", str(weights), "--workers", "1", "--views", "8",
            "--batch-size", "32"]  # 4 images a batch: two batches a shard

    def at(directory: str) -> list[str]:
        return [a if a != str(out) else str(tmp_path / directory / "teacher.h5") for a in args]

    # the process kills itself right after its third part file (pipeline.faults)
    killed = run_with_fault(args, "kill-after-shard:3", tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    parts = out.parent / "teacher.h5.parts"
    assert sorted(p.name for p in parts.iterdir() if p.suffix == ".h5") == \
        ["part-000000.h5", "part-000001.h5", "part-000002.h5"]  # and no partial fourth
    assert not out.exists()  # never a partial file at the output path
    dead = json.loads(out.with_name("teacher.h5.lock").read_text())["pid"]

    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 of 12 shards already done" in resumed.stderr
    assert f"taking over a stale lock of process {dead} " in resumed.stderr
    assert json.loads((tmp_path / "m.json").read_text())["images_this_run"] == 96 - 3 * 8
    assert len(list(parts.glob("part-*.h5"))) == 12  # the parts are the storage of the views

    # SIGTERM while batch 5 is encoded, the first half of shard 2: shards 0 and 1 are written, shard 2
    # is dropped (no part of it), one line, exit code 128 + 15, the lock released
    signalled = run_with_fault(at("signalled"), "sigterm-at-batch:5", tmp_path / "signalled.log")
    assert signalled.returncode == 128 + signal.SIGTERM, signalled.stderr[-2000:]
    assert [line for line in signalled.stderr.splitlines() if "stopped by" in line] == [
        "WARNING stages.precompute: stopped by SIGTERM after 2 of 12 shards of this run, the shard in progress "
        "dropped (4 images); run the same command to resume"]
    signalled_parts = tmp_path / "signalled" / "teacher.h5.parts"
    assert sorted(p.name for p in signalled_parts.iterdir()) == ["part-000000.h5", "part-000001.h5", "state.json"]
    assert not (tmp_path / "signalled" / "teacher.h5.lock").exists()
    resumed = subprocess.run(at("signalled"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 12 shards already done" in resumed.stderr

    uninterrupted = tmp_path / "clean" / "teacher.h5"
    assert subprocess.run(at("clean"), cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    assert_same_file(out, uninterrupted)
    assert_same_file(tmp_path / "signalled" / "teacher.h5", uninterrupted)


def test_bytes_per_view_formula_matches_the_file(full_cache, demo_shards, tiny_teacher, tmp_path):
    def views_storage(path):
        """Stored bytes of the views: views/image in the file, the rest in the part files."""
        with h5py.File(path) as f:
            total, rows = f["views/image"].id.get_storage_size(), f["views/image"].shape[0]
        for part in sorted(cache.parts_dir(path).glob("part-*.h5")):
            with h5py.File(part) as f:
                total += sum(f[name].id.get_storage_size() for name in cache.PER_VIEW if name in f)
        return total / rows

    image_part = (32 + 12) / 4
    assert views_storage(full_cache[0]) == cache.stored_bytes_per_view(48, 4) - image_part
    topk_out = tmp_path / "topk.h5"
    precompute.run(precompute_config(demo_shards, topk_out, tiny_teacher, topk=7, store_embeddings=True))
    expected = cache.stored_bytes_per_view(48, 4, topk=7, embed_dim=32, store_embeddings=True) - image_part
    assert views_storage(topk_out) == expected


def test_a_partial_run_is_kept_for_the_same_teacher_under_another_name_and_refused_for_other_settings(tmp_path):
    """resume_or_start compares the teacher by content: a renamed weights file keeps the parts;
    other views or other weights are refused in one line that says what changed."""
    identity = ("config=tiny-clip.json checkpoint=tiny-clip.safetensors weights_sha256=" + "a" * 64 +
                " arch_kind=two-tower arch=2e8c7d6a54de preprocess=adbeca9adac6 act=gelu open_clip=3.3.0 "
                "precision=bf16")
    header = cache.CacheHeader(
        teacher_identity=identity, embed_dim=32, teacher_image_size=32, teacher_mean=(0.5,) * 3,
        teacher_std=(0.25,) * 3, views_per_image=2, crop_scale=(0.6, 1.0), crop_ratio=(0.75, 1.33), flip=True,
        view_seed=0, prompt_digest="p" * 64, prompt_set="cpa", anchor_mode="class", num_classes=48, num_anchors=48,
        shard_digest="s" * 64, topk=0, store_embeddings=False)
    out = tmp_path / "teacher.h5"
    shards = ["train-000000.tar", "train-000001.tar"]
    precompute.resume_or_start(out, header, shards)
    renamed = identity.replace("config=tiny-clip.json checkpoint=tiny-clip.safetensors",
                               "config=mine.json checkpoint=my weights.safetensors")
    precompute.resume_or_start(out, dataclasses.replace(header, teacher_identity=renamed), shards)  # kept
    with pytest.raises(PipelineError) as error:
        precompute.resume_or_start(out, dataclasses.replace(header, views_per_image=4), shards)
    assert str(error.value) == (f"{out}.parts: a partial run with other settings (views_per_image); delete "
                                f"{out}.parts to start over, or run with the same settings")
    other = dataclasses.replace(header, teacher_identity=identity.replace("a" * 64, "b" * 64))
    with pytest.raises(PipelineError, match=r"other settings \(teacher: weights sha256: partial run "
                                            r"aaaaaaaaaaaa\.\.\., this run bbbbbbbbbbbb\.\.\.\)"):
        precompute.resume_or_start(out, other, shards)
