"""probe on the hard world with its shifted split: every model's accuracy on the shifted images,
and image-text retrieval on the val captions for the teacher and the student."""

from __future__ import annotations

import json

import torch

from pipeline import retrieval
from pipeline.features import extract_features
from pipeline.shards import list_shards, read_manifest
from pipeline.teacher import load_teacher
from stages import distill, precompute, probe, shards
from tests.conftest import precompute_config, stage_config


def test_probe_measures_the_shifted_split_and_retrieval_on_the_val_captions(tiny_teacher, tmp_path):
    shard_dir = tmp_path / "shards"
    shards.run(stage_config("shards", source="demo", world="hard", out=str(shard_dir), train=96, val=40, shifted=40,
                            max_per_shard=32, workers=1))
    assert read_manifest(shard_dir)["splits"]["shifted"]["samples"] == 40
    cache = tmp_path / "teacher.h5"
    precompute.run(precompute_config(shard_dir, cache, tiny_teacher, views=2))
    teacher_config, weights = tiny_teacher
    teacher_options = {"teacher__config": str(teacher_config), "teacher__checkpoint": str(weights)}
    distill.run(stage_config("distill", out=str(tmp_path / "student.pt"), run_dir=str(tmp_path / "run"),
                             metrics=str(tmp_path / "d.json"), plot=str(tmp_path / "d.csv"),
                             train__shards=str(shard_dir), train__cache=str(cache), train__image_size=32,
                             train__batch_size=16, train__epochs=1, train__workers=0, **teacher_options))
    config = stage_config("probe", shards=str(shard_dir), cache=str(cache), student=str(tmp_path / "student.pt"),
                          supervised="", out=str(tmp_path / "probe.json"), plots=str(tmp_path / "plots"),
                          distill_csv="", workers=0, **teacher_options)
    metrics = probe.run(config)
    assert json.loads((tmp_path / "probe.json").read_text()) == metrics
    for name in ("teacher", "student", "random_init"):  # the linear probe's classifier on the shifted images
        assert metrics[name]["shifted_linear_top1"] * 40 == round(metrics[name]["shifted_linear_top1"] * 40)
    for name in ("teacher", "student"):
        assert 0 <= metrics[name]["shifted_zeroshot_top1"] <= 1
        assert {f"retrieval_{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5)} <= set(metrics[name])

    # the teacher's retrieval, recomputed: its image embeddings of the val views and its text
    # embeddings of the distinct val captions
    teacher = load_teacher(config.teacher, "cpu", precision=config.precision)
    captions: list[str | None] = []
    features, _, _ = extract_features(list_shards(shard_dir, "val"), {"teacher": (teacher.image_size,
                                      teacher.encode_image)}, 64, 0, captions=captions)
    assert len(captions) == 40 and all(captions)
    texts, own = retrieval.distinct(captions)
    expected = retrieval.recall_at_k(features["teacher"], teacher.encode_text(texts), own)
    for key, value in expected.items():
        assert abs(metrics["teacher"][f"retrieval_{key}"] - value) <= 1 / len(texts), key
    # the shifted split is the world in another style, not the val split again
    shifted_features, _, _ = extract_features(list_shards(shard_dir, "shifted"),
                                              {"teacher": (teacher.image_size, teacher.encode_image)}, 64, 0)
    assert not torch.allclose(shifted_features["teacher"], features["teacher"])

    # the teacher measured alone (scripts/ablation.py --teacher-only: no cache, no student) gets
    # the probe's teacher figures: the same linear probe, CPA class anchors, shifted split, retrieval
    alone = probe.measure_teacher(teacher, str(shard_dir), config.prompts, torch.device("cpu"), batch_size=64,
                                  holdout_fraction=config.holdout_fraction, seed=config.seed)
    assert config.prompts.set == "cpa" and config.prompts.anchors == "class"
    for key in ("linear_top1", "shifted_linear_top1", "zeroshot_top1", "shifted_zeroshot_top1",
                *(f"retrieval_{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5))):
        assert alone[key] == metrics["teacher"][key], key
    assert alone["zeroshot_top1_plain"] == metrics["teacher"]["zeroshot_top1_plain"]
