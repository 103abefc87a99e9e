"""The demo-teacher stage: trains, saves a loadable teacher, measures plain vs CPA per homonym."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import demo_world
from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.features import extract_features
from pipeline.prompts import class_anchors
from pipeline.shards import list_shards, read_classes
from pipeline.teacher import load_teacher
from stages import demo_teacher
from tests.conftest import ROOT, make_tiny_teacher, stage_config


def assert_zero_shot_of_saved_weights(saved: dict, out, config_file, shards, prompts) -> None:
    """The zero-shot figures in `saved` (the stage's metrics file) are those of the weights in `out`:
    scored here on the val images from the teacher loaded as every stage loads it."""
    teacher = load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(out), config=str(config_file)),
                           "cpu")
    features, labels, _ = extract_features(list_shards(shards, "val"),
                                           {"teacher": (teacher.image_size, teacher.encode_image)}, 256, 0)
    classes = read_classes(shards)
    per_class = saved["zero_shot_per_class_with_context"]
    for prompt_set in ("plain", "cpa"):
        anchors = class_anchors(teacher.encode_text, classes, prompts, prompt_set)
        correct = (features["teacher"] @ anchors.T).argmax(-1) == labels
        assert saved[f"zero_shot_top1_{prompt_set}"] == pytest.approx(correct.float().mean().item(), abs=1e-9)
        for c in classes:
            if c.id in per_class and (labels == c.index).any():
                assert per_class[c.id][prompt_set] == round(correct[labels == c.index].float().mean().item(), 4)


def test_a_few_steps_save_a_teacher_and_report_the_homonyms(demo_shards, tmp_path):
    config_file, _ = make_tiny_teacher(tmp_path / "arch")
    out = tmp_path / "teacher.safetensors"
    config = stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file), out=str(out),
                          arch="two-tower", init="", steps=3, batch_size=8, warmup_steps=1, workers=0, eval_every=0)
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
    # the weights load as a teacher through the same path as the shipped one; the saved figures are theirs
    assert_zero_shot_of_saved_weights(saved, out, config_file, demo_shards, config.prompts)
    assert not out.with_name(out.name + ".resume.pt").exists()


def test_psd_objective_ramps_alpha_and_trains_a_loadable_teacher(demo_shards, tmp_path):
    config_file, _ = make_tiny_teacher(tmp_path / "arch")
    out = tmp_path / "psd.safetensors"
    config = stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file), out=str(out),
                          arch="two-tower", init="", steps=4, batch_size=8, warmup_steps=1, workers=0, eval_every=0,
                          objective="psd", psd_rho=1.0, psd_alpha_max=0.4, psd_ramp=0.5, caption_noise=0.3)
    metrics = demo_teacher.run(config)
    assert metrics["objective"] == "psd" and metrics["caption_noise"] == 0.3
    assert metrics["history"][-1]["alpha"] == 0.4  # the ramp reached alpha_max at half the steps
    assert demo_teacher.psd_alpha(config, 1) == 0.2 and demo_teacher.psd_alpha(config, 0) == 0.0
    clip = stage_config("demo_teacher", config=str(config_file), steps=4, objective="clip", psd_alpha_max=0.4)
    assert demo_teacher.psd_alpha(clip, 4) == 0.0
    assert_zero_shot_of_saved_weights(metrics, out, config_file, demo_shards, config.prompts)


def test_an_arch_other_than_the_config_files_is_refused_in_one_line(demo_shards, tmp_path):
    config_file, _ = make_tiny_teacher(tmp_path / "arch")
    config = stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file),
                          out=str(tmp_path / "t.safetensors"), arch="ms-clip")
    with pytest.raises(PipelineError, match=r"--arch ms-clip: .* is a two-tower model config"):
        demo_teacher.run(config)
    assert not (tmp_path / "t.safetensors").exists()


def test_an_ms_clip_teacher_pre_trains_and_loads_as_a_teacher(demo_shards, tmp_path):
    out = tmp_path / "msclip.safetensors"
    config_file = ROOT / "data/teachers/demo-msclip.json"
    config = stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file), arch="ms-clip",
                          out=str(out), init="", steps=2, batch_size=4, warmup_steps=1, workers=0, eval_every=0)
    metrics = demo_teacher.run(config)
    assert metrics["arch"] == "ms-clip" and "arch_kind=ms-clip" in metrics["identity"]
    teacher = load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(out), config=str(config_file)),
                           "cpu", precision="fp32")
    embeddings = teacher.encode_text(["a crane, a kind of bird.", "a bat."])
    assert embeddings.shape == (2, 128) and torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_the_metrics_hold_the_confusion_summary_of_the_cpa_classifier(demo_shards, tmp_path):
    config_file, _ = make_tiny_teacher(tmp_path / "arch")
    out = tmp_path / "teacher.safetensors"
    config = stage_config("demo_teacher", shards=str(demo_shards), config=str(config_file), out=str(out),
                          arch="two-tower", init="", steps=1, batch_size=8, warmup_steps=1, workers=0, eval_every=0)
    metrics = demo_teacher.run(config)
    summary = metrics["zero_shot_confusion_cpa"]
    assert summary["predictions"] == 48  # the val images of demo_shards
    assert summary["errors"] == round(48 * (1 - metrics["zero_shot_top1_cpa"]))
    assert "related_share" not in summary  # the easy world has no twins


def test_a_finite_caption_set_cycles_the_same_images_and_captions_with_new_crops():
    """train_images N: item i is image i mod N with the caption that image has every epoch (a noisy
    one stays wrong, as in a web dataset) and a new crop; 0: every item a fresh image, its caption
    noise drawn over the whole stream, as make_sample draws it for the shards."""
    tokenizer = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731 (captions via ids)
    images, noise, length = 6, 0.5, 24
    finite = demo_teacher.CaptionStream(5, length, 16, tokenizer, (0.3, 1.0), (0.75, 1.33), noise, images)
    endless = demo_teacher.CaptionStream(5, length, 16, tokenizer, (0.3, 1.0), (0.75, 1.33), noise)
    caption_ids = [finite[i][2] for i in range(length)]
    assert caption_ids == caption_ids[:images] * (length // images)
    expected = [demo_world.make_sample(5, "train", i, 16, noise, images).attributes.caption for i in range(images)]
    own = [demo_world.make_image(5, "train", i, 16)[1].caption for i in range(images)]
    assert expected != own  # some captions of the set are wrong, and stay wrong every epoch
    assert caption_ids[:images] == [demo_teacher.caption_id(c) for c in expected]
    assert not torch.equal(finite[0][0], finite[images][0])  # the same image, another crop
    assert [endless[i][2] for i in range(length)] == [
        demo_teacher.caption_id(demo_world.make_sample(5, "train", i, 16, noise, length).attributes.caption)
        for i in range(length)]
