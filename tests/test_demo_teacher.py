"""The demo-teacher stage: trains, saves a loadable teacher, measures plain vs CPA per homonym."""

from __future__ import annotations

import json

import torch

from pipeline import demo_world
from pipeline.config import TeacherConfig
from pipeline.teacher import load_teacher
from stages import demo_teacher
from tests.conftest import make_tiny_teacher, stage_config


def test_a_few_steps_save_a_teacher_and_report_the_homonyms(demo_shards, tmp_path):
    config_file, _ = make_tiny_teacher(tmp_path / "arch")
    out = tmp_path / "teacher.safetensors"
    config = stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file), out=str(out),
                          init="", steps=3, batch_size=8, warmup_steps=1, workers=0, eval_every=0)
    metrics = demo_teacher.run(config)
    assert metrics["steps"] == 3 and len(metrics["history"]) == 1
    saved = json.loads(out.with_suffix(".metrics.json").read_text())
    assert saved["zero_shot_top1_cpa"] == metrics["zero_shot_top1_cpa"]
    per_class = saved["zero_shot_per_class_with_context"]
    homonym_ids = {c.id for c in demo_world.demo_classes() if c.sense}
    assert set(per_class) == homonym_ids  # exactly the classes with a CPA context
    assert per_class["red_triangle"]["name"] == "crane" and per_class["red_triangle"]["context"] == "bird"
    measured = [row for row in per_class.values() if "plain" in row]
    assert measured and all({"plain", "cpa"} <= set(row) for row in measured)
    # the weights load as a teacher through the same path as the shipped one
    teacher = load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(out), config=str(config_file)),
                           "cpu", precision="fp32")
    assert teacher.encode_text(["a crane, a kind of bird."]).shape == (1, 32)
    assert torch.isfinite(teacher.encode_image(torch.rand(2, 3, 32, 32))).all()
    assert not out.with_name(out.name + ".resume.pt").exists()
