"""Faults: non-finite numbers, corrupt caches: refused in one line, never a silent wrong result."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline import cache, faults
from pipeline.atomic import OutputLock
from pipeline.errors import PipelineError
from pipeline.shards import MixedBatches, iter_shard, list_shards
from stages import distill, precompute, probe, supervised, verify
from stages import inspect as inspect_stage
from stages import shards as shards_stage
from tests.conftest import (
    ROOT,
    make_demo_shards,
    make_tiny_teacher,
    precompute_config,
    run_with_fault,
    stage_config,
)
from tests.test_distill import distill_config
from tests.test_precompute import assert_same_file


def test_non_finite_teacher_similarities_are_refused_before_writing(demo_shards, tmp_path):
    config, weights = make_tiny_teacher(tmp_path / "teacher", seed=4)
    state = load_file(str(weights))
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    broken = tmp_path / "teacher" / "broken.safetensors"
    save_file(state, str(broken))
    out = tmp_path / "cache.h5"
    with pytest.raises(PipelineError, match=r"train-000000.tar: the teacher gave non-finite similarities"):
        precompute.run(precompute_config(demo_shards, out, (config, broken)))
    assert not out.exists()
    assert not list(cache.parts_dir(out).glob("*.h5"))  # no part holds the NaNs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_shards, tiny_teacher, tmp_path):
    poisoned = tmp_path / "poisoned.h5"
    precompute.run(precompute_config(demo_shards, poisoned, tiny_teacher))
    shards = list_shards(demo_shards, "train")
    last_read = MixedBatches(shards, 16, None, None, seed=0, epoch=0, mix=1).rank_shards()[-1]
    with h5py.File(cache.part_path(poisoned, last_read), "a") as f:  # the last shard read holds NaNs,
        f["similarities"][:] = np.nan  # recorded as such (checksums match: a cache with NaNs in it)
        digests = cache.block_digests(f["similarities"][:], f.attrs["views_per_image"])
    with h5py.File(poisoned, "a") as f:
        f["checksums/similarities"][last_read] = digests
    config = distill_config(demo_shards, poisoned, tiny_teacher, tmp_path / "run",
                            **{"train.epochs": 2, "train.checkpoint_every": 1, "train.mix_shards": 1})
    with pytest.raises(PipelineError, match=r"distill: the loss is nan at epoch 1, step \d+ .*last\.pt keeps"):
        distill.run(config)
    last = torch.load(tmp_path / "run" / "run" / "last.pt", weights_only=True)
    assert last["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "student.pt").exists()


# --------------------------------------------------------------------------- corrupt caches


@pytest.fixture(scope="module")
def healthy(demo_shards, tiny_teacher, tmp_path_factory):
    """A cache (file + parts) to damage copies of, and a second one made with another view seed."""
    root = tmp_path_factory.mktemp("healthy")
    precompute.run(precompute_config(demo_shards, root / "a" / "teacher.h5", tiny_teacher))
    precompute.run(precompute_config(demo_shards, root / "b" / "teacher.h5", tiny_teacher, seed=7))
    return root


def copy_of(healthy, tmp_path) -> Path:
    shutil.copytree(healthy / "a", tmp_path / "copy")
    return tmp_path / "copy" / "teacher.h5"


def flip_bytes(path, dataset: str) -> None:
    """Flip one byte inside every view block of a contiguous dataset of an HDF5 file, on disk."""
    with h5py.File(path, "r") as f:
        offset, rows, row_bytes = f[dataset].id.get_offset(), f[dataset].shape[0], f[dataset].id.get_storage_size()
        views = f.attrs["views_per_image"]
    block = row_bytes // views
    with open(path, "r+b") as raw:
        for view in range(views):
            raw.seek(offset + view * block + 5)
            byte = raw.read(1)
            raw.seek(offset + view * block + 5)
            raw.write(bytes([byte[0] ^ 0x40]))
    assert rows > 0


def stages_reading(cache_path, demo_shards, tiny_teacher, tmp_path):
    """distill, supervised, probe and inspect, each reading `cache_path`."""
    return {
        "distill": lambda: distill.run(distill_config(demo_shards, cache_path, tiny_teacher, tmp_path / "d")),
        "supervised": lambda: supervised.run(stage_config(
            "supervised", out=str(tmp_path / "s.pt"), run_dir=str(tmp_path / "s"), metrics=str(tmp_path / "s.json"),
            plot=str(tmp_path / "s.csv"), **{"train.shards": str(demo_shards), "train.cache": str(cache_path),
                                             "train.image_size": 32, "train.epochs": 1})),
        "probe": lambda: probe.run(stage_config("probe", shards=str(demo_shards), cache=str(cache_path),
                                                student=str(tmp_path / "none.pt"), out=str(tmp_path / "p.json"))),
        "inspect": lambda: inspect_stage.summary(cache_path, 0.05),
    }


def test_a_truncated_cache_file_is_one_line_in_every_stage(healthy, demo_shards, tiny_teacher, tmp_path):
    path = copy_of(healthy, tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    for run in stages_reading(path, demo_shards, tiny_teacher, tmp_path).values():
        with pytest.raises(PipelineError, match=rf"^{path}: not a readable teacher cache \(.*\); re-run precompute$"):
            run()
    assert not list(tmp_path.rglob("*.pt"))


def test_a_missing_group_is_one_line_in_every_stage(healthy, demo_shards, tiny_teacher, tmp_path):
    path = copy_of(healthy, tmp_path)
    with h5py.File(path, "a") as f:
        del f["images"]
    for run in stages_reading(path, demo_shards, tiny_teacher, tmp_path).values():
        with pytest.raises(PipelineError, match=rf"^{path}: damaged, images/key, images/shard, images/position "
                                                r"missing; re-run precompute$"):
            run()


def test_flipped_bytes_in_a_part_are_refused_and_verify_names_the_shard(healthy, demo_shards, tiny_teacher,
                                                                        tmp_path, capsys):
    path = copy_of(healthy, tmp_path)
    flip_bytes(cache.part_path(path, 1), "similarities")
    for name, run in stages_reading(path, demo_shards, tiny_teacher, tmp_path).items():
        if name == "probe":
            continue  # the probe reads the anchors, never a view: nothing it uses is damaged
        with pytest.raises(PipelineError, match=rf"^{path}: similarities of view \d of shard 1 \(train-000001.tar\) "
                                                r"do not match the checksum recorded when the cache was written"):
            run()
    with pytest.raises(PipelineError, match=r"1 of 3 shards bad \(train-000001.tar\); delete their part files "
                                            r"\(.*part-000001.h5\) and re-run precompute"):
        verify.run(path)
    assert "bad shard 1 (train-000001.tar): similarities of view 0" in capsys.readouterr().out


def test_a_part_file_from_another_run_is_refused_and_verify_names_the_shard(healthy, demo_shards, tiny_teacher,
                                                                            tmp_path):
    path = copy_of(healthy, tmp_path)
    shutil.copy(cache.part_path(healthy / "b" / "teacher.h5", 2), cache.part_path(path, 2))  # other view seed
    with pytest.raises(PipelineError, match=r"params of view \d of shard 2 \(train-000002.tar\) do not match"):
        distill.run(distill_config(demo_shards, path, tiny_teacher, tmp_path / "d"))
    with pytest.raises(PipelineError, match=r"1 of 3 shards bad \(train-000002.tar\)"):
        verify.run(path)


def test_verify_passes_a_healthy_cache_and_repairs_take_one_rerun(healthy, demo_shards, tiny_teacher, tmp_path,
                                                                   capsys):
    verify.run(healthy / "a" / "teacher.h5")
    assert "ok: 3 shards, 96 images x 4 views, every checksum matches" in capsys.readouterr().out
    # the documented repair: delete the bad shard's part, run precompute again, get the healthy file
    path = copy_of(healthy, tmp_path)
    flip_bytes(cache.part_path(path, 0), "params")
    with pytest.raises(PipelineError, match="1 of 3 shards bad"):
        verify.run(path)
    cache.part_path(path, 0).unlink()
    metrics = precompute.run(precompute_config(demo_shards, path, tiny_teacher))
    assert metrics["images_this_run"] == 32
    verify.run(path)
    assert_same_file(healthy / "a" / "teacher.h5", path)
    cli = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "every checksum matches" in cli.stdout


# --------------------------------------------------------------------------- two writers


def precompute_cli(shards: Path, out: Path, teacher, views: int) -> list[str]:
    """`python -m pipeline precompute` over `shards` into `out` with the tiny teacher, metrics beside `out`."""
    config, weights = teacher
    return [sys.executable, "-m", "pipeline", "precompute", "--shards", str(shards), "--out", str(out),
            "--metrics", str(out.parent / "precompute.json"), "--teacher-config", str(config),
            "--teacher-checkpoint", str(weights), "--workers", "0", "--views", str(views), "--batch-size", "64"]


@pytest.mark.slow
def test_a_precompute_on_an_output_in_use_is_refused_and_a_stale_lock_taken_over(demo_shards, healthy,
                                                                                  tiny_teacher, tmp_path):
    out = tmp_path / "cache" / "teacher.h5"
    args = precompute_cli(demo_shards, out, tiny_teacher, views=4)
    with OutputLock(out):  # a live holder: this process
        refused = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(line) == 1, refused.stderr
    assert f"teacher.h5: in use by process {os.getpid()} on " in line[0] and "wait for it to finish" in line[0]
    assert not cache.parts_dir(out).exists()  # refused before anything was written
    # killed by SIGKILL after its first part (pipeline.faults): its lock stays behind, stale
    killed = run_with_fault(args, "kill-after-shard:1", tmp_path / "killed.log")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lock = out.with_name("teacher.h5.lock")
    dead = json.loads(lock.read_text())["pid"]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"taking over a stale lock of process {dead} " in again.stderr
    assert "1 of 3 shards already done" in again.stderr
    assert not lock.exists()
    assert_same_file(healthy / "a" / "teacher.h5", out)


def test_a_distill_on_a_run_dir_in_use_is_refused(demo_shards, tiny_teacher, tmp_path, healthy):
    config, weights = tiny_teacher
    args = [sys.executable, "-m", "pipeline", "distill", "--shards", str(demo_shards), "--cache",
            str(healthy / "a" / "teacher.h5"), "--image-size", "32", "--batch-size", "16", "--epochs", "1",
            "--workers", "0", "--teacher-config", str(config), "--teacher-checkpoint", str(weights),
            "--out", str(tmp_path / "student.pt"), "--run-dir", str(tmp_path / "run"),
            "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p.csv")]
    with OutputLock(tmp_path / "run"):  # a live holder: this process (a killed distill's lock: test_distill)
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"run: in use by process {os.getpid()} on " in second.stderr.strip()
    assert not (tmp_path / "run").exists()


def test_the_fault_hook_reads_its_points_and_refuses_anything_else():
    assert faults.parse("kill-after-step:7") == faults.Fault("step", 7)
    assert faults.parse("kill-after-shard:12") == faults.Fault("shard", 12)
    assert faults.parse("sigterm-at-step:3") == faults.Fault("step", 3, "sigterm-at")
    assert faults.parse("sigterm-at-batch:2") == faults.Fault("batch", 2, "sigterm-at")
    for value in ("kill-after-epoch:1", "kill-after-step:0", "kill-after-step", "kill-after-step:3 ", "1",
                  "sigterm-at-shard:1", "kill-after-batch:1"):
        with pytest.raises(PipelineError, match=rf"^environment CSM_DISTILL_FAULT='{value}': expected "
                                                r"kill-after-step:N, kill-after-shard:N, sigterm-at-step:N or "
                                                r"sigterm-at-batch:N with N >= 1"):
            faults.parse(value)


def test_the_cli_refuses_a_wrong_fault_hook_value_before_any_work(demo_shards, tiny_teacher, tmp_path):
    out = tmp_path / "cache" / "teacher.h5"
    result = subprocess.run(precompute_cli(demo_shards, out, tiny_teacher, views=4), cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "CSM_DISTILL_FAULT": "kill-after-shards:1"})
    line = error_line(result)
    assert line == ("error: environment CSM_DISTILL_FAULT='kill-after-shards:1': expected kill-after-step:N, "
                    "kill-after-shard:N, sigterm-at-step:N or sigterm-at-batch:N with N >= 1 (a test hook, see "
                    "pipeline/faults.py); unset it for a normal run")
    assert not out.parent.exists()


# --------------------------------------------------------------------------- bad images and shards


def write(path: Path, image, fmt: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    path.write_bytes(buffer.getvalue())


def test_odd_images_are_kept_as_rgb_and_broken_ones_listed(tmp_path):
    root = tmp_path / "images" / "n00000001"
    red = np.zeros((24, 32, 3), np.uint8)
    red[..., 0] = 200
    write(root / "cmyk.jpg", Image.fromarray(red).convert("CMYK"), "JPEG", quality=95)
    grey16 = Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16))  # mode I;16
    write(root / "grey16.png", grey16, "PNG")
    palette = Image.fromarray(red).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    write(root / "palette.png", palette, "PNG")
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 2], rgba[:, :16, 3] = 200, 255  # left half opaque blue, right half transparent
    write(root / "alpha.png", Image.fromarray(rgba, "RGBA"), "PNG")
    write(root / "png_named.jpg", Image.fromarray(red), "PNG")  # a wrong extension
    (root / "text_named.jpg").write_text("not an image")
    write(root / "bomb.png", Image.new("1", (20_000, 20_000)), "PNG")  # 400 Mpixel, a few KB on disk
    full = io.BytesIO()
    Image.fromarray(red).save(full, format="JPEG")
    (root / "truncated.jpg").write_bytes(full.getvalue()[:200])

    out = tmp_path / "shards"
    manifest = shards_stage.run(stage_config("shards", source="folder", root=str(tmp_path / "images"),
                                             out=str(out), val_fraction=0.0, workers=1))
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"text_named.jpg", "bomb.png", "truncated.jpg"}, skipped
    assert "decompression bomb" in skipped["bomb.png"].lower()
    images = {s.key.split("/")[-1]: s.image for s in iter_shard(out / "train-000000.tar", 0)}
    assert set(images) == {"cmyk_jpg", "grey16_png", "palette_png", "alpha_png", "png_named_jpg"}
    for key, image in images.items():
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 32), key
    assert abs(int(images["cmyk_jpg"][0].float().mean()) - 200) < 12 and images["cmyk_jpg"][2].float().mean() < 20
    grey = images["grey16_png"][0].float()
    assert 0 <= grey.min() < 5 and 230 < grey.max() <= 255  # scaled from 16 bits, not clipped to white
    alpha = images["alpha_png"]
    assert alpha[2, :, :12].float().mean() > 180 and alpha[0, :, 20:].float().mean() > 240  # over white


def test_truncated_and_empty_shards_give_what_they_hold_and_the_run_goes_on(tmp_path, tiny_teacher):
    shards = make_demo_shards(tmp_path / "shards", train=96, val=4, max_per_shard=32)
    whole = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(whole[:len(whole) // 2])  # cut inside a member
    (shards / "train-000002.tar").write_bytes(b"")
    out = tmp_path / "cache" / "teacher.h5"
    metrics = precompute.run(precompute_config(shards, out, tiny_teacher))
    kept = cache.TeacherCache(out).image_count.tolist()
    assert kept[0] == 32 and 0 < kept[1] < 32 and kept[2] == 0
    assert metrics["images"] == sum(kept)


# --------------------------------------------------------------------------- full disk


def file_size_limit(limit: int):
    """preexec_fn: writes beyond `limit` bytes per file fail with EFBIG, as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error to handle, not a signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_full_disk_during_precompute_is_one_line_and_a_rerun_completes(demo_shards, tiny_teacher, tmp_path, healthy):
    out = tmp_path / "cache" / "teacher.h5"
    args = precompute_cli(demo_shards, out, tiny_teacher, views=4)
    full = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(16_000))  # a part file is about 20 KB
    line = error_line(full)
    assert line.startswith(f"error: {cache.part_path(out, 0)}: could not be written (") and "disk is full" in line
    assert not out.exists() and not list(cache.parts_dir(out).glob("*.h5*"))  # nothing partial anywhere
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert_same_file(healthy / "a" / "teacher.h5", out)  # as if the disk had never been full


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_nothing_partial_and_a_rerun_ends_the_same(demo_shards, tiny_teacher,
                                                                                       tmp_path, healthy):
    config, weights = tiny_teacher

    def args(name: str) -> list[str]:
        d = tmp_path / name
        return [sys.executable, "-m", "pipeline", "distill", "--shards", str(demo_shards), "--cache",
                str(healthy / "a" / "teacher.h5"), "--image-size", "32", "--batch-size", "16", "--epochs", "2",
                "--workers", "0", "--teacher-config", str(config), "--teacher-checkpoint", str(weights),
                "--out", str(d / "student.pt"), "--run-dir", str(d / "run"), "--metrics", str(d / "m.json"),
                "--plot", str(d / "p.csv")]

    full = subprocess.run(args("full"), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(8_000_000))  # last.pt holds ~130 MB
    line = error_line(full)
    assert line.startswith(f"error: {tmp_path / 'full' / 'run' / 'last.pt'}: could not be written (")
    assert not list((tmp_path / "full").rglob("*.pt*"))  # no partial checkpoint, no student
    again = subprocess.run(args("full"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    clean = subprocess.run(args("clean"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "clean" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_full_disk_during_the_join_is_one_line_and_a_rerun_only_joins(demo_shards, tiny_teacher, tmp_path):
    out = tmp_path / "cache" / "teacher.h5"
    args = precompute_cli(demo_shards, out, tiny_teacher, views=1)
    # parts of 32 images x 1 view are ~8 KB; the cache file (prompts, anchors, checksums) is larger
    full = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(14_000))
    line = error_line(full)
    assert line.startswith(f"error: {out}: could not be written (") and "disk is full" in line
    assert not out.exists() and len(list(cache.parts_dir(out).glob("part-*.h5"))) == 3
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "3 of 3 shards already done" in again.stderr, again.stderr
    clean = tmp_path / "clean" / "teacher.h5"
    precompute.run(precompute_config(demo_shards, clean, tiny_teacher, views=1))
    assert_same_file(clean, out)
