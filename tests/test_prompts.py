"""Prompt sets, CPA strings, anchors and the prompt-set digest."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest
import torch
import torch.nn.functional as F

from pipeline import demo_world
from pipeline.config import PromptsConfig, TeacherConfig
from pipeline.errors import PipelineError
from pipeline.prompts import (
    STORE_DIR,
    anchor_embeddings,
    build_prompt_set,
    class_anchors,
    encode_prompts,
    prompt_set_digest,
    prompt_store,
    read_templates,
)
from pipeline.resources import DATA_DIR, imagenet_by_wnid
from pipeline.shards import ClassInfo
from pipeline.teacher import load_teacher
from stages.shards import folder_class_info
from tests.conftest import make_tiny_teacher

IMAGENET = PromptsConfig(set="cpa", plain_templates=str(DATA_DIR / "prompts/imagenet_plain.txt"),
                         cpa_templates=str(DATA_DIR / "prompts/imagenet_cpa.txt"), anchors="class")
DEMO = PromptsConfig(set="cpa", plain_templates=str(DATA_DIR / "prompts/demo_plain.txt"),
                     cpa_templates=str(DATA_DIR / "prompts/demo_cpa.txt"), anchors="class")


def test_cpa_disambiguates_imagenet_cranes():
    classes = folder_class_info(["n02012849", "n03126707"])
    prompts = build_prompt_set(classes, IMAGENET)
    bird = [p for p, c in zip(prompts.prompts, prompts.prompt_classes, strict=True) if c == 0]
    machine = [p for p, c in zip(prompts.prompts, prompts.prompt_classes, strict=True) if c == 1]
    assert len(bird) == len(machine) == 80
    assert bird[0] == "a bad photo of a crane bird, a type of wading bird."
    assert machine[0] == "a bad photo of a construction crane, a type of lifting device."
    assert not set(bird) & set(machine)
    plain = build_prompt_set(classes, dataclasses.replace(IMAGENET, set="plain"))
    assert plain.prompts[0] == "a bad photo of a crane bird."


def test_cpa_disambiguates_the_maillots_and_missiles():
    for pair in (["n03710637", "n03710721"], ["n03773504", "n04008634"]):
        prompts = build_prompt_set(folder_class_info(pair), IMAGENET)
        assert prompts.prompts[0] != prompts.prompts[80]
        assert prompts.prompts[0].split(", a type of ")[1] != prompts.prompts[80].split(", a type of ")[1]


def test_every_imagenet_class_gets_distinct_cpa_prompts():
    wnids = sorted(imagenet_by_wnid(), key=lambda w: imagenet_by_wnid()[w]["index"])
    assert len(wnids) == 1000
    prompts = build_prompt_set(folder_class_info(wnids), dataclasses.replace(
        IMAGENET, cpa_templates=str(DATA_DIR / "prompts/demo_cpa.txt")))
    first_per_class = {}
    for text, cls in zip(prompts.prompts, prompts.prompt_classes, strict=True):
        first_per_class.setdefault(cls, text)
    assert len(set(first_per_class.values())) == 1000


def test_demo_cpa_disambiguates_exactly_the_homonyms():
    classes = [ClassInfo(c.index, c.id, c.name, demo_world.demo_contexts(c))
               for c in demo_world.demo_classes()]
    homonyms = [c for c in classes if c.contexts]
    assert len(homonyms) == 2 * len(demo_world.HOMONYMS)
    cpa = build_prompt_set(classes, DEMO)
    plain = build_prompt_set(classes, dataclasses.replace(DEMO, set="plain"))
    assert len(plain.prompts) == len(classes) * 3 and plain.prompts[0] == "a photo of a red circle."
    assert len(cpa.prompts) == len(classes) * 3  # one context per homonym, 3 templates each

    def prompts_of(prompt_set, index):
        return [p for p, c in zip(prompt_set.prompts, prompt_set.prompt_classes, strict=True) if c == index]

    crane_bird = next(c for c in classes if c.id == "red_triangle")
    crane_machine = next(c for c in classes if c.id == "blue_cross")
    assert crane_bird.name == crane_machine.name == "crane"
    # plain prompts cannot tell the two cranes apart; CPA prompts can
    assert prompts_of(plain, crane_bird.index) == prompts_of(plain, crane_machine.index)
    assert "a photo of a crane, a kind of bird." in prompts_of(cpa, crane_bird.index)
    assert "a photo of a crane, a kind of machine." in prompts_of(cpa, crane_machine.index)
    for c in classes:  # every other class: CPA falls back to the plain prompts
        same = prompts_of(cpa, c.index) == prompts_of(plain, c.index)
        assert same == (not c.contexts)
    assert cpa.num_anchors == len(classes)
    assert dataclasses.replace(cpa, anchors="prompt").num_anchors == len(cpa.prompts)


def test_class_anchors_of_either_set_follow_the_text_encoder():
    classes = [ClassInfo(c.index, c.id, c.name, demo_world.demo_contexts(c))
               for c in demo_world.demo_classes()]
    seen = []

    def encode_text(texts):  # a deterministic stand-in text encoder: a random vector per string
        seen.append(list(texts))
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:12], 16) for t in texts]
        return torch.stack([torch.randn(64, generator=torch.Generator().manual_seed(s)) for s in seeds])

    plain = class_anchors(encode_text, classes, DEMO, "plain")
    cpa = class_anchors(encode_text, classes, DEMO, "cpa")
    assert plain.shape == cpa.shape == (len(classes), 64)
    assert seen[0] == list(build_prompt_set(classes, dataclasses.replace(DEMO, set="plain")).prompts)
    differs = [i for i in range(len(classes)) if not torch.allclose(plain[i], cpa[i])]
    assert differs == [c.index for c in classes if c.contexts]


def test_class_without_context_falls_back_to_plain_templates():
    prompts = build_prompt_set([ClassInfo(0, "x", "widget")], IMAGENET)
    assert prompts.prompts[0] == "a bad photo of a widget."


def test_anchors_are_unit_norm_means_of_prompt_embeddings():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(7, 5), dim=-1)
    classes = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    anchors = anchor_embeddings(embeddings, classes, 3, "class")
    assert torch.allclose(anchors.norm(dim=-1), torch.ones(3), atol=1e-6)
    for k in range(3):
        direct = embeddings[classes == k].mean(0)
        assert torch.allclose(anchors[k], direct / direct.norm(), atol=1e-6)
    assert torch.allclose(anchor_embeddings(embeddings, classes, 3, "prompt"), embeddings, atol=1e-6)
    with pytest.raises(PipelineError, match="no prompts"):
        anchor_embeddings(embeddings, classes, 4, "class")


def test_digest_changes_with_templates_classes_and_anchors(tmp_path):
    templates = tmp_path / "plain.txt"
    templates.write_text("a photo of a {name}.\n")
    config = PromptsConfig(set="plain", plain_templates=str(templates), cpa_templates="", anchors="class")
    classes = [ClassInfo(0, "a", "cat"), ClassInfo(1, "b", "dog")]
    digest = prompt_set_digest(build_prompt_set(classes, config))
    assert digest == prompt_set_digest(build_prompt_set(classes, config))
    assert digest != prompt_set_digest(build_prompt_set(classes[::-1], config))
    assert digest != prompt_set_digest(build_prompt_set(classes, dataclasses.replace(config, anchors="prompt")))
    templates.write_text("a picture of a {name}.\n")
    assert digest != prompt_set_digest(build_prompt_set(classes, config))


class CountingTeacher:
    """A real teacher that counts the strings it encodes."""

    def __init__(self, teacher) -> None:
        self.teacher, self.identity, self.encoded = teacher, teacher.identity, 0

    def encode_text(self, texts, progress=None):
        self.encoded += len(texts)
        return self.teacher.encode_text(texts, progress=progress)


def test_prompt_embeddings_are_reused_for_the_same_teacher_and_strings(tmp_path, caplog):
    first_weights = make_tiny_teacher(tmp_path / "a", seed=0)
    teacher = CountingTeacher(load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(first_weights[1]),
                                                         config=str(first_weights[0])), "cpu"))
    prompts = [f"a photo of a {name}." for name in ("cat", "dog", "crane", "space shuttle")]
    store = tmp_path / "cache" / STORE_DIR
    with caplog.at_level(logging.INFO, logger="pipeline.prompts"):
        encoded = encode_prompts(teacher, prompts, store)
    assert teacher.encoded == 4 and "prompts: encoding 4 prompts with the teacher" in caplog.text
    assert torch.equal(encoded, teacher.teacher.encode_text(prompts))
    assert len(list(store.glob("*.npy"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.prompts"):
        again = encode_prompts(teacher, prompts, store)
    assert teacher.encoded == 4 and torch.equal(again, encoded)  # read back, not encoded again
    assert "4 prompt embeddings read from" in caplog.text
    encode_prompts(teacher, prompts[:3], store)  # other strings: encoded
    assert teacher.encoded == 7
    other_config, other_weights = make_tiny_teacher(tmp_path / "b", seed=1)
    other = CountingTeacher(load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(other_weights),
                                                       config=str(other_config)), "cpu"))
    assert not torch.equal(encode_prompts(other, prompts, store), encoded)  # another teacher: its own
    assert other.encoded == 4 and len(list(store.glob("*.npy"))) == 3
    assert prompt_store(tmp_path / "cache" / "teacher.h5") == store


def test_bad_templates_name_the_file_and_line(tmp_path):
    path = tmp_path / "cpa.txt"
    path.write_text("# comment\na photo of a {name}.\n")
    with pytest.raises(PipelineError, match=r"cpa.txt:2: template lacks \{context\}"):
        read_templates(path, ["name", "context"], "--prompts-cpa-templates")
    with pytest.raises(PipelineError, match="not found"):
        read_templates(tmp_path / "none.txt", ["name"], "--prompts-plain-templates")
