"""`--decode device` (pipeline/decoding.py): on the CPU the views decoded and cut by the training
process are the workers' views bit for bit, a corrupt sample is dropped as the workers drop it,
and a distill run ends with the same weights either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import decoding
from pipeline.cache import TeacherCache
from pipeline.shards import MixedBatches, list_shards, loader_batches, make_loader
from pipeline.student import load_student
from pipeline.training import ReplayViews
from stages import distill, precompute
from tests.conftest import precompute_config, stage_config


@pytest.fixture(scope="module")
def cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoding") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, views=2))
    return out


def batches(demo_shards, cache_path, on_device: bool, workers: int):
    cache = TeacherCache(cache_path)
    replay = ReplayViews(cache, 0, 1, 40, with_targets=True, pairs=True, on_device=on_device)
    dataset = MixedBatches(list_shards(demo_shards, "train"), 16, replay, replay.context, seed=0, epoch=1,
                           decode=not on_device)
    return list(loader_batches(make_loader(dataset, workers)))


def test_views_cut_on_the_device_are_the_workers_views_bit_for_bit(demo_shards, cache):
    on_cpu = batches(demo_shards, cache, False, 1)
    sent = batches(demo_shards, cache, True, 1)
    assert all(decoding.BYTES in b and "pixels" not in b for b in sent)
    assert all(b[decoding.BYTES][0].dtype == torch.uint8 for b in sent)
    on_device = [decoding.device_views(b, torch.device("cpu"), 40) for b in sent]
    assert len(on_cpu) == len(on_device) == 6
    for a, b in zip(on_cpu, on_device, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["pixels_pair"], b["pixels_pair"])
        assert torch.equal(a["targets"], b["targets"]) and torch.equal(a["labels"], b["labels"])


def test_a_sample_nothing_can_decode_is_dropped_and_reported(demo_shards, cache):
    batch = batches(demo_shards, cache, True, 0)[0]
    batch[decoding.BYTES][3] = decoding.encoded(b"\xff\xd8\xff\xe0 not really a jpeg")
    key = batch["keys"][3]
    out = decoding.device_views(batch, torch.device("cpu"), 40)
    assert out["corrupt"] == [key] and key not in out["keys"]
    assert out["pixels"].shape[0] == out["labels"].shape[0] == out["targets"].shape[0] == len(out["keys"]) == 15
    # a PNG among JPEGs: the batched call fails, each sample then decodes on its own (PIL for the PNG)
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buffer, format="PNG")
    batch = batches(demo_shards, cache, True, 0)[0]
    batch[decoding.BYTES][0] = decoding.encoded(buffer.getvalue())
    out = decoding.device_views(batch, torch.device("cpu"), 40)
    assert out["corrupt"] == [] and out["pixels"].shape[0] == 16 and int(out["pixels"][0].float().mean()) == 200


def test_distill_with_device_decoding_ends_with_the_same_weights(demo_shards, cache, tiny_teacher, tmp_path):
    teacher_config, weights = tiny_teacher
    students = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        config = stage_config("distill", out=str(out / "student.pt"), run_dir=str(out / "run"),
                              metrics=str(out / "m.json"), plot=str(out / "p.csv"), train__shards=str(demo_shards),
                              train__cache=str(cache), train__image_size=32, train__batch_size=16, train__epochs=1,
                              train__workers=1, train__decode=decode, teacher__config=str(teacher_config),
                              teacher__checkpoint=str(weights))
        distill.run(config)
        students[decode] = load_student(config.out)[0].state_dict()
    assert all(torch.equal(students["cpu"][k], students["device"][k]) for k in students["cpu"])


def test_precompute_with_device_decoding_writes_the_same_cache(demo_shards, cache, tiny_teacher, tmp_path):
    """The teacher's device decodes the batch and cuts each image's views (the worker only reads the
    JPEG's header for the view parameters): on the CPU, the same file in every dataset and attribute."""
    from tests.test_precompute import assert_same_file

    out = tmp_path / "device.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, views=2, decode="device", workers=1))
    assert_same_file(cache, out)
