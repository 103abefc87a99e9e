"""The teacher equals OpenAI's own CLIP code on OpenAI's two file formats.

OpenAI's `clip.model.CLIP` (the `clip-anytorch` package, a test-only dependency) is built with
seeded random weights - a ViT and a modified ResNet at small dimensions, and a ViT at the exact
ViT-B/32 dimensions - and saved the two ways OpenAI's files exist: a TorchScript archive that
`clip.load(..., jit=True)` reads (with the `input_resolution`, `context_length` and `vocab_size`
tensors OpenAI's archives carry), and a plain `torch.save(model.state_dict())`. Each file goes
through the project's `load_teacher`; its image and text embeddings must equal OpenAI's
normalised `encode_image` / `encode_text` on the same pixels and strings within 1e-4 in fp32.
A GELU build of the same weights misses by far more, so the comparison can tell the activations
apart. The class anchors must equal open_clip's `build_zero_shot_classifier`.
"""

from __future__ import annotations

import os
from pathlib import Path

import clip
import clip.model
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP as OpenClipCLIP

from pipeline.config import PromptsConfig, TeacherConfig
from pipeline.errors import PipelineError
from pipeline.prompts import anchor_embeddings, build_prompt_set
from pipeline.shards import ClassInfo
from pipeline.teacher import (
    Teacher,
    identity_difference,
    load_teacher,
    openai_model_config,
    parse_identity,
    resolve_teacher,
    resolved_architecture,
    teacher_identity,
)

TOLERANCE = 1e-4
OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
TEXTS = ["a photo of a crane, a type of wading bird.", "A BAD photo of the Dog!!",
         "itap of a 3-d café,   with  spaces", ""]

# OpenAI's CLIP constructor arguments: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads,
# transformer_layers. Widths are multiples of 64: OpenAI's build_model assumes 64 per head.
SMALL = {
    "vit": (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2),
    "resnet": (32, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 2),
}
VIT_B_32 = (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)


def openai_clip(arguments: tuple, seed: int) -> clip.model.CLIP:
    """OpenAI's CLIP with seeded random weights that exercise every layer.

    OpenAI's initialisation zeroes biases and the last BatchNorm of every residual block and
    leaves norms at identity; those are randomised too, so no part of the network is a no-op.
    """
    torch.manual_seed(seed)
    model = clip.model.CLIP(*arguments)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and not parameter.any():
                parameter.normal_(0, 0.02)
    return model.eval()


def save_torchscript(model: clip.model.CLIP, path: Path) -> Path:
    """The model as a TorchScript archive like OpenAI's releases.

    OpenAI's archives are traced modules with `encode_image` and `encode_text`, and carry the
    input resolution, context length and vocabulary size as tensors beside the weights (what
    `clip.load(jit=True)` reads). Changes `model` (those become buffers); its outputs stay.
    """
    resolution = model.visual.input_resolution
    del model.context_length, model.vocab_size  # plain ints on OpenAI's module
    model.register_buffer("input_resolution", torch.tensor(resolution))
    model.register_buffer("context_length", torch.tensor(model.positional_embedding.shape[0]))
    model.register_buffer("vocab_size", torch.tensor(model.token_embedding.weight.shape[0]))
    images = torch.zeros(1, 3, resolution, resolution)
    traced = torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (clip.tokenize(["a"]),)},
                                    check_trace=False)
    traced.save(str(path))
    return path


def openai_embeddings(model, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI's own image and text embeddings, normalised, for [0, 1] pixels and strings."""
    with torch.no_grad():
        image = model.encode_image((pixels - OPENAI_MEAN) / OPENAI_STD)
        text = model.encode_text(clip.tokenize(texts))
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


def teacher_from(path: Path, model: str = "") -> Teacher:
    return load_teacher(TeacherConfig(model=model, pretrained="", checkpoint=str(path), config=""), "cpu",
                        precision="fp32")


def differences(teacher: Teacher, pixels: torch.Tensor, texts: list[str],
                reference: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Max abs differences of the teacher's image and text embeddings from OpenAI's."""
    image = (teacher.encode_image(pixels) - reference[0]).abs().max().item()
    text = (teacher.encode_text(texts) - reference[1]).abs().max().item()
    return image, text


@pytest.fixture(scope="module", params=sorted(SMALL))
def small_openai_files(request, tmp_path_factory):
    """(files, pixels, OpenAI's embeddings) of one small architecture."""
    model = openai_clip(SMALL[request.param], seed=0)
    resolution = model.visual.input_resolution
    pixels = torch.rand(3, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    reference = openai_embeddings(model, pixels, TEXTS)
    directory = tmp_path_factory.mktemp(request.param)
    files = {"state_dict": directory / "state_dict.pt"}
    torch.save(model.state_dict(), files["state_dict"])
    files["torchscript"] = save_torchscript(model, directory / "torchscript.pt")
    return files, pixels, reference


@pytest.mark.parametrize("form", ["torchscript", "state_dict"])
def test_small_openai_files_match_openai_clip(small_openai_files, form):
    files, pixels, reference = small_openai_files
    teacher = teacher_from(files[form])
    image, text = differences(teacher, pixels, TEXTS, reference)
    assert image <= TOLERANCE and text <= TOLERANCE, (image, text)
    assert parse_identity(teacher.identity)["act"] == "quickgelu"
    assert teacher.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)

    # The same weights with nn.GELU miss by far more than the tolerance: the test sees the activation.
    spec = resolve_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(files[form]), config=""))
    gelu = OpenClipCLIP(**{**spec.model_config, "quick_gelu": False}).eval()
    gelu.load_state_dict(teacher.model.state_dict())
    with torch.no_grad():
        gelu_text = F.normalize(gelu.encode_text(teacher.tokenizer(TEXTS)), dim=-1)
    assert (gelu_text - reference[1]).abs().max().item() > 10 * TOLERANCE


def test_the_archive_is_what_openai_clip_load_reads(small_openai_files):
    files, pixels, reference = small_openai_files
    scripted, _ = clip.load(str(files["torchscript"]), device="cpu", jit=True)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert torch.allclose(openai_embeddings(scripted, pixels, TEXTS)[0], reference[0], atol=1e-6)


def test_a_model_name_must_describe_the_openai_file(small_openai_files):
    files, _, _ = small_openai_files
    with pytest.raises(PipelineError, match="do not fit --teacher-model ViT-B-32-quickgelu") as error:
        teacher_from(files["torchscript"], model="ViT-B-32-quickgelu")
    assert "\n" not in str(error.value)


def test_vit_b_32_files_match_openai_clip(tmp_path):
    """The exact ViT-B/32 dimensions, stored as OpenAI stores its releases: fp16 convolutions and
    linear layers, the archive traced in fp16 (`clip.load(jit=True)` patches it to fp32 on CPU)."""
    model = openai_clip(VIT_B_32, seed=0)
    clip.model.convert_weights(model)
    state_dict = tmp_path / "ViT-B-32-state-dict.pt"
    torch.save(model.state_dict(), state_dict)
    archive = save_torchscript(model, tmp_path / "ViT-B-32.pt")
    model.float()  # what clip.load does on CPU: the fp16 values, computed in fp32
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    texts = TEXTS[:2]
    reference = openai_embeddings(model, pixels, texts)
    openai_tag = teacher_identity(TeacherConfig(model="ViT-B-32", pretrained="openai", checkpoint="", config=""))

    identities = {}
    for path, name in ((archive, "ViT-B-32-quickgelu"), (state_dict, "")):
        teacher = teacher_from(path, model=name)
        image, text = differences(teacher, pixels, texts, reference)
        assert image <= TOLERANCE and text <= TOLERANCE, (path.name, image, text)
        # The architecture derived from the file is open_clip's ViT-B-32 with the openai tag.
        assert parse_identity(teacher.identity)["arch"] == parse_identity(openai_tag)["arch"]
        identities[path] = teacher.identity
    with pytest.raises(PipelineError, match="use --teacher-model ViT-B-32-quickgelu"):
        teacher_identity(TeacherConfig(model="ViT-B-32", pretrained="", checkpoint=str(archive), config=""))

    # The README's offline route: a cache made with the -quickgelu name and OpenAI's file fits the
    # same bytes given with --teacher-model "" and under another file name.
    renamed = tmp_path / "openai-vit-b32.pt"
    os.link(archive, renamed)  # the same bytes under another name, without another 350 MB on disk
    made_with = identities[archive]
    for name, path in (("", archive), ("", renamed), ("ViT-B-32-quickgelu", renamed)):
        params = teacher_identity(TeacherConfig(model=name, pretrained="", checkpoint=str(path), config=""))
        assert identity_difference(made_with, params) == "", (name, path.name)
    # Other bytes (here the same weights saved as a state dict) are another teacher.
    assert identity_difference(made_with, identities[state_dict]).startswith("weights sha256: cache ")


@pytest.mark.parametrize("release", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16",
                                     "ViT-L-14", "ViT-L-14-336"])
def test_every_openai_release_derives_to_its_quickgelu_model(release):
    """The architecture read from the shapes of each OpenAI release is exactly open_clip's
    `-quickgelu` config (which carries the openai tag), so those names fit OpenAI's files."""
    name = f"{release}-quickgelu"
    config = open_clip.get_model_config(name)
    with torch.device("meta"):  # shapes only: no memory, no time
        state = OpenClipCLIP(**config).state_dict()
    derived = openai_model_config(state, Path(f"{release}.pt"))
    assert resolved_architecture(derived, release) == resolved_architecture(config, name)
    assert "openai" in open_clip.list_pretrained_tags_by_model(name)


def test_class_anchors_equal_open_clip_zero_shot_classifier(small_openai_files, tmp_path):
    files, _, _ = small_openai_files
    teacher = teacher_from(files["state_dict"])
    templates = ["a photo of a {name}.", "a blurry photo of the {name}.", "itap of my {name}."]
    names = ["crane", "goldfish", "crane", "space shuttle"]
    template_file = tmp_path / "templates.txt"
    template_file.write_text("\n".join(templates) + "\n")
    prompts = build_prompt_set([ClassInfo(i, str(i), name) for i, name in enumerate(names)],
                               PromptsConfig(set="plain", plain_templates=str(template_file),
                                             cpa_templates="", anchors="class"))
    ours = anchor_embeddings(teacher.encode_text(list(prompts.prompts)), torch.tensor(prompts.prompt_classes),
                             prompts.num_classes, "class")
    theirs = open_clip.build_zero_shot_classifier(
        teacher.model, teacher.tokenizer, names, [t.replace("{name}", "{}") for t in templates],
        num_classes_per_batch=3)
    assert (ours - theirs.T).abs().max().item() <= 1e-5
