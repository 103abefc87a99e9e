"""Teacher loading: file round trip, identity (activation included), QuickGELU, clear errors."""

from __future__ import annotations

import logging
import shutil

import h5py
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from pipeline.cache import TeacherCache
from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.precision import cpu_has_native_bf16
from pipeline.shards import list_shards, sha256_file
from pipeline.teacher import (
    identity_difference,
    identity_warnings,
    is_torchscript_archive,
    load_teacher,
    parse_identity,
    teacher_identity,
)
from stages import distill, precompute
from tests.conftest import make_tiny_teacher, precompute_config, stage_config


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
    assert f"weights_sha256={sha256_file(weights)}" in identity
    assert identity.endswith(f" act=gelu open_clip={open_clip.__version__}")
    other_config, other_weights = make_tiny_teacher(tmp_path / "b", seed=1)
    assert teacher_identity(file_teacher(config, other_weights)) != identity


def pretrained_identity(model: str, tag: str) -> dict[str, str]:
    return parse_identity(teacher_identity(TeacherConfig(model=model, pretrained=tag, checkpoint="", config="")))


def test_the_openai_tag_gets_quickgelu_whatever_the_model_name_says():
    """open_clip 3.x builds ViT-B-32 + openai with nn.GELU (it only warns); the tag decides here."""
    openai = pretrained_identity("ViT-B-32", "openai")
    assert openai["act"] == "quickgelu" and openai["open_clip"] == open_clip.__version__
    assert pretrained_identity("ViT-B-32-quickgelu", "openai")["arch"] == openai["arch"]
    laion = pretrained_identity("ViT-B-32", "laion2b_s34b_b79k")
    assert laion["act"] == "gelu" and laion["arch"] != openai["arch"]
    assert pretrained_identity("ViT-L-14", "openai")["act"] == "quickgelu"


def test_random_teachers_are_built_with_the_activation_their_identity_records():
    for model, module in (("RN50", torch.nn.GELU), ("RN50-quickgelu", QuickGELU)):
        config = TeacherConfig(model=model, pretrained="", checkpoint="", config="")
        teacher = load_teacher(config, "cpu", allow_random=True)
        text_activations = {type(m) for m in teacher.model.transformer.modules()
                            if isinstance(m, (torch.nn.GELU, QuickGELU))}
        assert text_activations == {module}
        precision = "bf16" if cpu_has_native_bf16() else "fp32"  # what autocast runs at on this CPU
        assert teacher.identity == f"{teacher_identity(config)} weights=random precision={precision}"
        assert parse_identity(teacher.identity)["act"] == ("gelu" if module is torch.nn.GELU else "quickgelu")


def test_identity_difference_compares_content_not_names_in_one_line():
    source = "weights_source=hf-hub:timm/vit_base_patch32_clip_224.openai/"
    cache = (f"model=ViT-B-32 pretrained=openai {source} weights_sha256={'a' * 64} arch_kind=two-tower "
             f"arch=38d113a8020b preprocess=44136fa355b3 act=quickgelu open_clip=3.2.0 precision=bf16")
    # Another spelling of the model, the tag's file not downloaded here, another open_clip release,
    # no precision (the params side of a check): the same teacher.
    params = (f"model=ViT-B-32-quickgelu pretrained=openai {source} arch_kind=two-tower arch=38d113a8020b "
              f"preprocess=44136fa355b3 act=quickgelu open_clip=3.3.0")
    assert identity_difference(cache, params) == ""
    assert identity_warnings(cache, params) == [
        "made with open_clip 3.2.0, this is 3.3.0: the same weights, architecture and preprocessing, so used as "
        "it is (a new release's outputs can differ in rounding; re-run precompute to have them from this one)"]
    assert identity_warnings(cache, cache) == []
    assert identity_difference(cache, params.replace("act=quickgelu", "act=gelu")) == (
        "act: cache quickgelu, params gelu")
    assert identity_difference(cache, cache.replace("precision=bf16", "precision=fp32")) == (
        "precision: cache bf16, params fp32")
    other_tag = params.replace("timm/vit_base_patch32_clip_224.openai/", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/")
    assert identity_difference(cache, other_tag) == (
        "weights: cache hf-hub:timm/vit_base_patch32_clip_224.openai/, "
        "params hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K/")
    # A local file against a tag that is not downloaded here: nothing to compare the bytes with.
    file_params = f"checkpoint=ViT-B-32.pt weights_sha256={'b' * 64} arch_kind=two-tower arch=38d113a8020b " \
                  f"preprocess=44136fa355b3 act=quickgelu"
    assert identity_difference(file_params, params, sides=("cache", "student")) == (
        "weights: cache sha256 bbbbbbbbbbbb..., student hf-hub:timm/vit_base_patch32_clip_224.openai/, not "
        "downloaded here (cannot be compared)")
    assert identity_difference(cache, file_params) == "weights sha256: cache aaaaaaaaaaaa..., params bbbbbbbbbbbb..."
    assert identity_difference("model=ViT-B-32 pretrained=openai", "arch_kind=two-tower arch=38d113a8020b") == (
        "arch_kind: cache (none), params two-tower; arch: cache (none), params 38d113a8020b; weights: cache "
        "unknown, not downloaded here, params unknown, not downloaded here (cannot be compared)")
    assert parse_identity("checkpoint=my file.pt weights_sha256=ab") == {"checkpoint": "my file.pt",
                                                                        "weights_sha256": "ab"}


def test_a_renamed_weights_file_fits_its_cache_and_other_weights_do_not(demo_shards, tiny_teacher, tmp_path):
    """The cache's teacher is its content: the same bytes under other file names (config and
    weights) are accepted by distill; other weights are refused in one line naming their sha256."""
    out = tmp_path / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, views=1))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    config_copy, weights_copy = renamed / "my-teacher.json", renamed / "my-teacher-weights.safetensors"
    shutil.copyfile(tiny_teacher[0], config_copy)
    shutil.copyfile(tiny_teacher[1], weights_copy)
    shards = list_shards(demo_shards, "train")

    def distill_config(config_file, weights_file):
        return stage_config("distill", **{"train.shards": str(demo_shards), "train.cache": str(out),
                                          "teacher.config": str(config_file), "teacher.checkpoint": str(weights_file)})

    cache = TeacherCache(out)
    assert "checkpoint=tiny-clip.safetensors" in cache.header.teacher_identity
    distill.check_cache(cache, distill_config(config_copy, weights_copy), shards)  # accepted
    _, other_weights = make_tiny_teacher(tmp_path / "other", seed=7)
    with pytest.raises(PipelineError) as error:
        distill.check_cache(cache, distill_config(config_copy, other_weights), shards)
    assert str(error.value) == (
        f"{out}: made by another teacher than the params' (weights sha256: cache "
        f"{sha256_file(tiny_teacher[1])[:12]}..., params {sha256_file(other_weights)[:12]}...); re-run precompute "
        f"or fix the teacher options")


def test_distill_refuses_a_cache_made_by_another_build_in_one_line(demo_shards, tiny_teacher, tmp_path, caplog):
    out = tmp_path / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, views=1))
    config = stage_config("distill", **{"train.shards": str(demo_shards), "train.cache": str(out),
                                        "teacher.config": str(tiny_teacher[0]),
                                        "teacher.checkpoint": str(tiny_teacher[1])})
    distill.check_cache(TeacherCache(out), config, list_shards(demo_shards, "train"))  # the same build fits
    with h5py.File(out, "a") as f:
        f.attrs["teacher_identity"] = str(f.attrs["teacher_identity"]).replace(
            f"open_clip={open_clip.__version__}", "open_clip=2.26.1")
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):  # another release: a warning, not a refusal
        distill.check_cache(TeacherCache(out), config, list_shards(demo_shards, "train"))
    assert f"made with open_clip 2.26.1, this is {open_clip.__version__}" in caplog.text
    with h5py.File(out, "a") as f:
        f.attrs["teacher_identity"] = str(f.attrs["teacher_identity"]).replace("act=gelu", "act=quickgelu")
    with pytest.raises(PipelineError) as error:
        distill.check_cache(TeacherCache(out), config, list_shards(demo_shards, "train"))
    message = str(error.value)
    assert "made by another teacher than the params' (act: cache quickgelu, params gelu)" in message
    assert "\n" not in message and "re-run precompute" in message


def test_openai_named_state_dict_needs_quickgelu(tmp_path):
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
