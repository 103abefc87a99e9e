"""The bench command runs every measurement on a tiny setup and reports the documented keys."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cache import TeacherCache, stored_bytes_per_view, topk_index_dtype
from pipeline.teacher import load_teacher
from stages import bench, precompute
from tests.conftest import precompute_config, stage_config

KEYS = {"cached_over_plain", "cached_over_compute", "online_over_cached_time", "precompute_over_teacher",
        "rss_growth_8x", "bytes_per_view_full", "bytes_per_view_topk"}


@pytest.mark.slow
def test_bench_reports_every_ratio(demo_shards, tiny_teacher, tmp_path, capsys):
    cache = tmp_path / "teacher.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher))
    config, weights = tiny_teacher
    out = tmp_path / "bench.json"
    result = bench.run(stage_config(
        "bench", train__shards=str(demo_shards), train__cache=str(cache), train__image_size=32,
        train__batch_size=16, steps=2, warmup_steps=1, train__workers=1, topk=4, views=2, precompute_shards=1,
        json=str(out), data_path_images=4, data_path_size=32, data_path_max_sides="320",
        **{"teacher.config": str(config), "teacher.checkpoint": str(weights)}))
    written = json.loads(out.read_text())
    assert KEYS <= set(written) and written == json.loads(json.dumps(result))
    teacher = load_teacher(precompute_config(demo_shards, cache, tiny_teacher).teacher, "cpu")
    assert {k: written[k] for k in ("teacher", "teacher_image_size", "student", "batch_size", "steps", "topk")} == \
        {"teacher": teacher.identity, "teacher_image_size": 32, "student": "resnet18@32px", "batch_size": 16,
         "steps": 2, "topk": 4}
    # precompute end to end decodes, renders and writes around the teacher's forward: it cannot be faster
    assert written["precompute_over_teacher"] < 1
    # the data path alone, full-size JPEGs and pre-sized to 320
    assert set(written["data_path"]) == {"full", "max_side_320"}
    assert written["data_path"]["max_side_320"]["decoded_size"] == [240, 320]
    assert written["data_path"]["max_side_320"]["decode_speedup"] == (
        written["data_path"]["full"]["ms_per_image"]["decode"] / written["data_path"]["max_side_320"]["ms_per_image"]
        ["decode"])
    # (e) exactly the layout's bytes per view (48 anchors, 2 views; a key counts as its 16-byte heap reference)
    assert written["bytes_per_view_full"] == stored_bytes_per_view(48, 2, key_bytes=16)
    assert written["bytes_per_view_topk"] == stored_bytes_per_view(48, 2, topk=4, key_bytes=16)
    assert written["cache_bytes_1x"] == TeacherCache(cache).stored_bytes()
    # the ratios are the quotients of the raw measurements they name
    assert written["cached_over_plain"] == pytest.approx(
        written["cached_images_per_second"] / written["plain_images_per_second"])
    assert written["cached_over_compute"] == pytest.approx(
        written["cached_images_per_second"] / written["compute_images_per_second"])
    assert written["online_over_cached_time"] == pytest.approx(
        written["cached_images_per_second"] / written["online_images_per_second"])
    assert written["precompute_over_teacher"] == pytest.approx(
        written["precompute_views_per_second"] / written["teacher_views_per_second"])
    assert written["rss_growth_8x"] == pytest.approx(written["peak_rss_mib_8x"] / written["peak_rss_mib_1x"] - 1)
    # 48 anchors: full float16 similarities take 96 bytes of a view, top-4 4 x (index + float16)
    topk_bytes = 4 * (topk_index_dtype(48).itemsize + 2)
    assert written["bytes_per_view_full"] - written["bytes_per_view_topk"] == 96 - topk_bytes
    assert written["cache_bytes_8x"] > written["cache_bytes_1x"]
    # an epoch reads the rows it uses, whatever the number of stored views: with 8x the views,
    # it reads no more (the old layout read all of them: 8x more); HDF5 metadata is the rest
    assert written["read_per_used_byte_1x"] >= 1
    assert written["read_per_used_byte_8x"] <= 1.1 * written["read_per_used_byte_1x"]
    table = capsys.readouterr().out
    assert "cached_over_plain" in table and "cached_over_compute" in table and "(f) peak RSS" in table


def test_timed_window_waits_for_the_device_at_both_ends(monkeypatch):
    """The clock starts after the warm-up's queued work is done and stops after the window's:
    `synchronize` runs right after the warm-up and right after the last timed step."""
    events = []
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append(("synchronize", device.type)))

    def batches():
        while True:
            yield {"keys": ["a", "b", "c"]}

    result = bench.timed(batches(), lambda batch: events.append("step"), warmup=2, steps=3,
                         device=torch.device("cpu"))
    assert events == ["step", "step", ("synchronize", "cpu"), "step", "step", "step", ("synchronize", "cpu")]
    assert result["images"] == 9 and result["images_per_second"] == result["images"] / result["seconds"]


def test_bare_teacher_is_timed_on_uint8_views_made_once_on_its_device(tiny_teacher, demo_shards, tmp_path):
    """(d) feeds the teacher what precompute feeds it, uint8 views (its own normalisation runs in
    the window), already on its device: the same tensor every call, made before the window."""
    teacher = load_teacher(precompute_config(demo_shards, tmp_path / "unused.h5", tiny_teacher).teacher, "cpu")
    seen = []
    encode = teacher.encode_image

    def recording(views):
        seen.append(views)
        return encode(views)

    teacher.encode_image = recording
    config = stage_config("bench", steps=1, views=2)
    assert bench.measure_teacher_forward(config, teacher) > 0
    assert len(seen) >= 2 and all(views is seen[0] for views in seen)
    assert seen[0].dtype == torch.uint8 and seen[0].device == teacher.device
    assert seen[0].shape == (bench.precompute_batch_size(config), 3, 32, 32)


def test_the_data_path_is_timed_per_part_and_its_rates_are_what_the_parts_add_up_to():
    from pipeline import datapath
    from pipeline.shards import decode_rgb

    full = datapath.measure(images=4, image_size=32, teacher_size=48, views=3, batch_size=2, repeats=1)
    small = datapath.measure(images=4, image_size=32, teacher_size=48, views=3, batch_size=2, repeats=1,
                             max_side=200)
    assert full["decoded_size"] == [375, 500] and small["decoded_size"] == [150, 200]
    assert decode_rgb(datapath.imagenet_like_jpeg(0)).shape == (3, 375, 500)
    assert datapath.imagenet_like_jpeg(3) == datapath.imagenet_like_jpeg(3)  # deterministic
    for m in (full, small):
        ms = m["ms_per_image"]
        assert all(value > 0 for value in ms.values())
        distill = ms["read"] + ms["decode"] + ms["student_view"] + ms["collate_student"]
        precompute = ms["read"] + ms["decode"] + ms["teacher_views"] + ms["collate_teacher"]
        assert abs(m["distill_images_per_second_per_core"] - 1000 / distill) < 1e-6
        assert abs(m["precompute_images_per_second_per_core"] - 1000 / precompute) < 1e-6
    assert small["jpeg_bytes"] < full["jpeg_bytes"] / 2  # 200 x 150 holds a sixth of the pixels
    assert datapath.cores_per_gpu(3000, 600) == 5
