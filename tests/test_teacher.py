"""Teacher loading: file round trip, identity, QuickGELU guard, clear errors."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.teacher import is_torchscript_archive, load_teacher, teacher_identity
from tests.conftest import make_tiny_teacher


def file_teacher(config, weights) -> TeacherConfig:
    return TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config))


def test_saved_teacher_matches_the_in_memory_model(tmp_path):
    config, weights = make_tiny_teacher(tmp_path, seed=3)
    torch.manual_seed(3)
    in_memory = open_clip.create_model("tiny-clip").eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    teacher = load_teacher(file_teacher(config, weights), "cpu", precision="fp32")
    assert teacher.image_size == 32 and teacher.embed_dim == 32
    pixels = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_image = F.normalize(in_memory.encode_image((pixels - mean) / std), dim=-1)
        expected_text = F.normalize(in_memory.encode_text(tokenizer(["a red star", "a crane"])), dim=-1)
    assert torch.allclose(teacher.encode_image(pixels), expected_image, atol=1e-6)
    assert torch.allclose(teacher.encode_text(["a red star", "a crane"]), expected_text, atol=1e-6)
    assert torch.allclose(teacher.encode_image(pixels).norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training


def test_identity_names_files_and_their_sha256(tmp_path):
    config, weights = make_tiny_teacher(tmp_path / "a", seed=0)
    identity = teacher_identity(file_teacher(config, weights))
    assert "config=tiny-clip.json" in identity and "checkpoint=tiny-clip.safetensors" in identity
    other_config, other_weights = make_tiny_teacher(tmp_path / "b", seed=1)
    assert teacher_identity(file_teacher(config, other_weights)) != identity
    pretrained = TeacherConfig(model="ViT-B-32", pretrained="openai", checkpoint="", config="")
    assert teacher_identity(pretrained) == "model=ViT-B-32 pretrained=openai"


def test_openai_weights_from_a_file_need_quickgelu(tmp_path):
    weights = tmp_path / "ViT-B-32-openai.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    config = TeacherConfig(model="ViT-B-32", pretrained="", checkpoint=str(weights), config="")
    with pytest.raises(PipelineError, match="ViT-B-32-quickgelu"):
        load_teacher(config, "cpu")


def test_torchscript_archives_are_recognised(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    archive = tmp_path / "model.pt"
    scripted.save(str(archive))
    assert is_torchscript_archive(archive)
    plain = tmp_path / "state.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert not is_torchscript_archive(plain)


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    config, _ = make_tiny_teacher(tmp_path)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(PipelineError, match="does not fit model tiny-clip"):
        load_teacher(file_teacher(config, wrong), "cpu")


def test_missing_files_and_names_are_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="--teacher-checkpoint"):
        load_teacher(TeacherConfig(model="ViT-B-32", pretrained="", checkpoint=str(tmp_path / "x.pt"),
                                   config=""), "cpu")
    with pytest.raises(PipelineError, match="not an open_clip model"):
        load_teacher(TeacherConfig(model="ViT-Q-99", pretrained="", checkpoint="", config=""), "cpu")
    with pytest.raises(PipelineError, match="no weights given"):
        load_teacher(TeacherConfig(model="RN50", pretrained="", checkpoint="", config=""), "cpu")


def test_unknown_pretrained_tag_is_one_line():
    config = TeacherConfig(model="RN50", pretrained="no-such-tag", checkpoint="", config="")
    with pytest.raises(PipelineError, match="--teacher-pretrained no-such-tag for RN50") as error:
        load_teacher(config, "cpu")
    assert "\n" not in str(error.value)
