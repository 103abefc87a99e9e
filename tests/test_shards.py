"""Shards: folder and demo sources written, read back, deterministic; corrupt inputs reported."""

from __future__ import annotations

import io
import json
import logging
import os
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.shards import (
    ShardBatches,
    iter_shard,
    iterate_batches,
    list_shards,
    read_classes,
    usable_workers,
)
from stages import shards as shards_stage
from tests.conftest import make_demo_shards, stage_config, write_image


def folder_config(root, out, **changes):
    settings = dict(source="folder", root=str(root), out=str(out), val_root="", val_fraction=0.0,
                    max_per_shard=5, workers=1)
    return stage_config("shards", **{**settings, **changes})


def read_all(directory, split):
    return [s for i, shard in enumerate(list_shards(directory, split)) for s in iter_shard(shard, i)]


def test_folder_round_trip_keys_labels_pixels(image_folder, tmp_path):
    out = tmp_path / "shards"
    manifest = shards_stage.run(folder_config(image_folder, out))
    samples = read_all(out, "train")
    assert len(samples) == 14  # 2 classes x (6 JPEG + 1 PNG); the broken file is skipped
    assert len(list_shards(out, "train")) == 3  # 5 + 5 + 4
    assert all("." not in s.key for s in samples)
    by_key = {s.key: s for s in samples}
    jpeg = by_key["n03126707/n03126707_3_JPEG"]
    assert jpeg.label == 1
    original = np.asarray(Image.open(image_folder / "n03126707" / "n03126707_3.JPEG").convert("RGB"))
    assert torch.equal(jpeg.image, torch.from_numpy(original).permute(2, 0, 1))  # bytes kept as is
    png = by_key["n02012849/n02012849_extra_png"]
    assert png.label == 0
    source = np.asarray(Image.open(image_folder / "n02012849" / "n02012849_extra.png").convert("RGB"))
    error = (png.image.permute(1, 2, 0).float() - torch.from_numpy(source).float()).abs().mean()
    assert png.image.shape == (3, 32, 40) and error < 25  # re-encoded as JPEG: close, not equal
    assert manifest["splits"]["train"]["per_class"] == {"0": 7, "1": 7}
    shard_rows = manifest["splits"]["train"]["shards"]
    assert [row["samples"] for row in shard_rows] == [5, 5, 4]
    assert all(len(row["sha256"]) == 64 for row in shard_rows)
    # labels are mixed across shards, not class-sorted
    assert len({s.label for s in samples[:5]}) == 2


def test_png_is_reencoded_and_jpeg_is_not(image_folder, tmp_path):
    out = tmp_path / "shards"
    shards_stage.run(folder_config(image_folder, out))
    raw = {}
    for shard in list_shards(out, "train"):
        for sample in wds.tariterators.tarfile_samples([{"url": str(shard)}]):
            raw[sample["__key__"]] = sample["jpg"]
    original = (image_folder / "n02012849" / "n02012849_0.JPEG").read_bytes()
    assert raw["n02012849/n02012849_0_JPEG"] == original
    assert Image.open(io.BytesIO(raw["n02012849/n02012849_extra_png"])).format == "JPEG"


def test_corrupt_image_is_skipped_and_listed(image_folder, tmp_path):
    out = tmp_path / "shards"
    shards_stage.run(folder_config(image_folder, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [row["path"].endswith("broken.JPEG") for row in manifest["skipped"]] == [True]
    assert "unreadable image" in manifest["skipped"][0]["reason"]


def test_classes_use_imagenet_names_and_contexts(image_folder, tmp_path):
    out = tmp_path / "shards"
    shards_stage.run(folder_config(image_folder, out))
    classes = read_classes(out)
    assert [c.id for c in classes] == ["n02012849", "n03126707"]
    assert (classes[0].name, classes[1].name) == ("crane bird", "construction crane")
    assert classes[0].contexts == ("wading bird",) and classes[1].contexts == ("lifting device",)


def test_folder_shards_are_byte_identical_across_runs(image_folder, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    shards_stage.run(folder_config(image_folder, first, workers=2))
    shards_stage.run(folder_config(image_folder, second))
    for a, b in zip(list_shards(first, "train"), list_shards(second, "train"), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_val_fraction_and_val_root(image_folder, tmp_path):
    out = tmp_path / "split"
    manifest = shards_stage.run(folder_config(image_folder, out, val_fraction=0.3))
    train_keys = {s.key for s in read_all(out, "train")}
    val_keys = {s.key for s in read_all(out, "val")}
    assert train_keys and val_keys and not train_keys & val_keys
    assert len(train_keys) + len(val_keys) == 14
    assert manifest["splits"]["val"]["samples"] == len(val_keys)

    val_root = tmp_path / "val_images"
    write_image(val_root / "n03126707" / "v.JPEG", seed=5)
    out = tmp_path / "with_val_root"
    shards_stage.run(folder_config(image_folder, out, val_root=str(val_root)))
    assert [(s.key, s.label) for s in read_all(out, "val")] == [("n03126707/v_JPEG", 1)]


def test_missing_or_empty_root_is_a_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        shards_stage.run(folder_config(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no class folders"):
        shards_stage.run(folder_config(tmp_path / "empty", tmp_path / "out"))


def test_demo_shards_are_deterministic(tmp_path):
    a = make_demo_shards(tmp_path / "a", train=40, val=10, max_per_shard=16)
    b = make_demo_shards(tmp_path / "b", train=40, val=10, max_per_shard=16)
    c = make_demo_shards(tmp_path / "c", train=40, val=10, max_per_shard=16, seed=1)
    for split in ("train", "val"):
        for x, y in zip(list_shards(a, split), list_shards(b, split), strict=True):
            assert x.read_bytes() == y.read_bytes()
    assert list_shards(a, "train")[0].read_bytes() != list_shards(c, "train")[0].read_bytes()
    samples = read_all(a, "train")
    assert len(samples) == 40 and all(s.caption for s in samples)
    assert {s.image.shape for s in samples} == {(3, 64, 64)}


def test_reader_reports_corrupt_samples_and_keeps_order(tmp_path):
    shard = tmp_path / "train-000000.tar"
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good, format="JPEG")
    with wds.TarWriter(str(shard)) as writer:
        for i in range(5):
            data = b"garbage" if i == 2 else good.getvalue()
            writer.write({"__key__": f"k{i}", "jpg": data, "cls": i})

    def prepare(sample, context):
        return {"pixels": sample.image.float()}

    batches = list(ShardBatches([shard], batch_size=2, prepare=prepare))
    assert [b["keys"] for b in batches] == [["k0", "k1"], ["k3", "k4"]]
    assert [b["corrupt"] for b in batches] == [[], ["k2"]]
    assert batches[-1]["last"] and not batches[0]["last"]
    assert batches[0]["pixels"].shape == (2, 3, 8, 8)


def test_reader_with_workers_is_deterministic(demo_shards):
    shards = list_shards(demo_shards, "train")

    def prepare(sample, context):
        return {"label": torch.tensor(sample.label)}

    def keys(seed):
        dataset = ShardBatches(shards, 10, prepare, order_seed=seed, epoch=1)
        return [k for batch in iterate_batches(dataset, workers=2) for k in batch["keys"]]

    first, second = keys(3), keys(3)
    assert first == second and len(first) == 96 and len(set(first)) == 96
    assert keys(4) != first  # another seed, another order
    in_order = [k for batch in iterate_batches(ShardBatches(shards, 10, prepare), 0) for k in batch["keys"]]
    assert in_order == sorted(in_order)


def test_workers_beyond_the_cores_are_capped_in_one_line(demo_shards, caplog):
    """More DataLoader workers than cores: one log line, the loader made with as many workers as
    cores, and no torch warning (it would repeat at every loader)."""
    cores = len(os.sched_getaffinity(0))
    shards = list_shards(demo_shards, "train")

    def prepare(sample, context):
        return {"worker": torch.tensor(torch.utils.data.get_worker_info().id)}

    asked = cores + 37  # a count no other test asks for: the line is said once per process
    with caplog.at_level(logging.INFO, logger="pipeline.shards"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            used = {int(w) for batch in iterate_batches(ShardBatches(shards, 10, prepare), workers=asked)
                    for w in batch["worker"]}
    assert used == set(range(min(cores, len(shards))))
    assert usable_workers(asked) == cores and usable_workers(cores) == cores and usable_workers(0) == 0
    capped = [r.getMessage() for r in caplog.records if "DataLoader workers" in r.getMessage()]
    assert capped == [f"workers {asked}: this process may use {cores} CPU core(s); running {cores} DataLoader workers"]
    assert not [w for w in caught if "worker" in str(w.message).lower()]


def test_hard_world_shards_record_their_world_and_its_classes(tmp_path, demo_shards):
    from pipeline.shards import demo_world_of, iter_shard, list_shards, read_classes  # noqa: I001

    out = tmp_path / "hard"
    shards_stage.run(stage_config("shards", source="demo", out=str(out), train=24, val=8, max_per_shard=16,
                                  world="hard", workers=1))
    assert demo_world_of(out) == "hard" and demo_world_of(demo_shards) == "easy"
    classes = read_classes(out)
    assert len(classes) == 64 and classes[1].id == "red_octagon" and classes[1].name == "red octagon"
    samples = [s for i, shard in enumerate(list_shards(out, "train")) for s in iter_shard(shard, i)]
    assert len(samples) == 24 and all(s.image.shape == (3, 64, 64) for s in samples)
    meta = [json.loads(m) for shard in list_shards(out, "train")
            for m in (sample["json"] for sample in wds.WebDataset(str(shard), shardshuffle=False))]
    assert len(meta) == 24 and any("distractor_colour" in m for m in meta)
    with pytest.raises(PipelineError, match="not demo shards"):
        demo_world_of(tmp_path)


def test_max_side_presizes_larger_images_once_and_keeps_the_others_byte_for_byte(image_folder, tmp_path):
    """`--max-side`: an image whose longer side is larger is stored resized to it (Lanczos, JPEG
    quality 90), its aspect kept; a smaller one is stored as it is; the manifest says so."""
    write_image(image_folder / "n02012849" / "large.JPEG", seed=7, size=(120, 90))
    out = tmp_path / "shards"
    manifest = shards_stage.run(folder_config(image_folder, out, max_side=60))
    assert manifest["max_side"] == 60
    raw = {}
    for shard in list_shards(out, "train"):
        for sample in wds.tariterators.tarfile_samples([{"url": str(shard)}]):
            raw[sample["__key__"]] = sample["jpg"]
    large = Image.open(io.BytesIO(raw["n02012849/large_JPEG"]))
    assert large.size == (60, 45) and large.format == "JPEG"
    reference = Image.open(image_folder / "n02012849" / "large.JPEG").convert("RGB").resize(
        (60, 45), Image.Resampling.LANCZOS)
    error = np.abs(np.asarray(large.convert("RGB"), np.float32) - np.asarray(reference, np.float32)).mean()
    assert error < 4  # the Lanczos resize, then one JPEG encoding at quality 90
    assert raw["n02012849/n02012849_0_JPEG"] == (image_folder / "n02012849" / "n02012849_0.JPEG").read_bytes()
    # the same folder without --max-side gives other shards: a cache of one is refused for the other
    plain = shards_stage.run(folder_config(image_folder, tmp_path / "plain"))
    assert plain["max_side"] == 0
    assert plain["splits"]["train"]["shards"] != manifest["splits"]["train"]["shards"]
