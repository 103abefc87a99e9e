"""timm students (`--arch timm/NAME`) and the clip-mlp head: what an open_clip export relies on."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from open_clip.timm_model import TimmModel
from timm.layers import Conv2dSame
from torch import nn

from pipeline.errors import PipelineError
from pipeline.student import IMAGENET_MEAN, IMAGENET_STD, MatmulConv2d, Student, load_student, student_on
from pipeline.views import normalize_pixels
from stages import distill, precompute
from stages.probe import random_init_like
from tests.conftest import precompute_config
from tests.test_distill import distill_config

HEADS = ("linear", "mlp", "clip-mlp")


def uint8_pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("head", HEADS)
def test_a_timm_mobilenet_student_gives_unit_embeddings_from_its_real_pooled_width(head):
    torch.manual_seed(0)
    model = Student("timm/mobilenetv3_small_100", 32, head=head, head_hidden=64).eval()
    with torch.no_grad():
        features = model.features(uint8_pixels(4, 64))
        embeddings = model(uint8_pixels(4, 64))
    # the pooled output goes through MobileNetV3's 1 x 1 head convolution: 1,024 wide, not num_features (576)
    assert model.backbone.num_features == 576
    assert features.shape == (4, model.feature_dim) and model.feature_dim == 1024
    assert embeddings.shape == (4, 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    # ImageNet's normalisation for every arch, not the timm model's pretrained_cfg (MobileNetV3's is the same,
    # so the buffers are what is checked)
    assert model.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert model.std.flatten().tolist() == pytest.approx(IMAGENET_STD)


def test_a_torchvision_resnet18_backbone_is_timm_resnet18_key_for_key():
    """The open_clip export writes a torchvision ResNet student as a timm trunk: same keys, same features."""
    torch.manual_seed(0)
    student = Student("resnet18", 32).eval()
    trunk = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    trunk.load_state_dict(student.backbone.state_dict(), strict=True)
    pixels = uint8_pixels(4, 64)
    with torch.no_grad():
        expected = student.features(pixels)
        features = trunk(normalize_pixels(pixels, student.mean, student.std))
    assert features.shape == expected.shape == (4, 512)
    assert (features - expected).abs().max().item() <= 1e-5


def test_the_clip_mlp_head_is_open_clips_timm_mlp_projection():
    """A timm/resnet18 student with the clip-mlp head loads, renamed, into open_clip's TimmModel with
    proj="mlp", proj_bias=True (strict) and gives the same output, head alone and end to end."""
    torch.manual_seed(0)
    student = Student("timm/resnet18", 32, head="clip-mlp", normalize_output=False).eval()
    assert [name for name, _ in student.head.named_parameters()] == [
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert student.head.mlp.fc1.out_features == 64 and isinstance(student.head.mlp.act, nn.GELU)
    torch.manual_seed(1)  # other weights, so that a failed copy shows
    visual = TimmModel("resnet18", embed_dim=32, proj="mlp", proj_bias=True).eval()
    renamed = {key.replace("backbone.", "trunk.", 1): value for key, value in student.state_dict().items()
               if key not in ("mean", "std")}
    visual.load_state_dict(renamed, strict=True)
    pixels = uint8_pixels(4, 64)
    with torch.no_grad():
        features = student.features(pixels)
        torch.testing.assert_close(visual.head(features), student.head(features), rtol=0, atol=0)
        torch.testing.assert_close(visual(normalize_pixels(pixels, student.mean, student.std)), student(pixels),
                                   rtol=1e-6, atol=1e-6)
    # what `normalize_output` adds is open_clip's encode_image(normalize=True)
    normalized = copy.deepcopy(student)
    normalized.normalize_output = True
    with torch.no_grad():
        torch.testing.assert_close(normalized(pixels), nn.functional.normalize(student(pixels), dim=-1))


@pytest.mark.parametrize(("arch", "message"), [
    ("timm/not_a_model", "option --arch timm/not_a_model: not a timm model; see timm.list_models()"),
    ("timm/hf-hub:timm/resnet18.a1_in1k", "option --arch timm/hf-hub:timm/resnet18.a1_in1k: not a timm model; "
                                          "see timm.list_models()"),  # refused, never fetched
    ("not_a_model", "option --arch not_a_model: not a torchvision model; see torchvision.models.list_models()"),
    ("mobilenetv3_small_100", "option --arch mobilenetv3_small_100: not a torchvision model; "
                              "see torchvision.models.list_models()"),  # timm's name without the prefix
])
def test_unknown_arch_names_are_one_line_errors(arch, message):
    with pytest.raises(PipelineError) as error:
        Student(arch, 8)
    assert str(error.value) == message


def test_unknown_head_is_a_one_line_error():
    with pytest.raises(PipelineError) as error:
        Student("timm/mobilenetv3_small_100", 8, head="clip")
    assert str(error.value) == "option --head clip: expected one of linear, mlp, clip-mlp"


def test_student_on_the_cpu_leaves_timms_own_conv2d_subclasses_alone():
    """tf_ MobileNetV3 pads its strided convolutions as TensorFlow does, with timm's Conv2dSame: those stay."""
    torch.manual_seed(0)
    reference = Student("timm/tf_mobilenetv3_small_100", 16, head="clip-mlp").eval()
    model = student_on(copy.deepcopy(reference), torch.device("cpu"))
    kinds = {name: type(module) for name, module in reference.named_modules()}
    swapped = {name for name, module in model.named_modules() if type(module) is MatmulConv2d}
    assert swapped == {name for name, kind in kinds.items() if kind is nn.Conv2d}
    assert any(kind is Conv2dSame for kind in kinds.values())
    assert all(type(module) is Conv2dSame for name, module in model.named_modules() if kinds[name] is Conv2dSame)
    pixels = uint8_pixels(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference(pixels), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def demo_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_timm") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out


def test_distill_trains_and_saves_a_timm_student(demo_shards, demo_cache, tiny_teacher, tmp_path):
    # 96 demo images, batches of 48: two steps
    config = distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path, train__arch="timm/mobilenetv3_small_100",
                            train__head="clip-mlp", train__epochs=1, train__batch_size=48)
    metrics = distill.run(config)
    assert metrics["epochs"] == 1 and torch.isfinite(torch.tensor(metrics["final_loss"]))
    model, checkpoint = load_student(tmp_path / "student.pt")
    assert checkpoint["model"]["arch"] == "timm/mobilenetv3_small_100" and checkpoint["model"]["head"] == "clip-mlp"
    assert type(model.backbone).__name__ == "MobileNetV3" and not model.training
    # the saved weights are the trained ones: the probe's random-init row (distill's seed) starts where they did
    initial = random_init_like(checkpoint)
    assert initial.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(initial.head.mlp.fc1.weight, model.head.mlp.fc1.weight)
    pixels = uint8_pixels(4, 32)
    with torch.no_grad():
        expected = model(pixels)
        on_cpu = student_on(copy.deepcopy(model), torch.device("cpu"))
        convolutions = [m for m in model.modules() if type(m) is nn.Conv2d]
        assert sum(type(m) is MatmulConv2d for m in on_cpu.modules()) == len(convolutions) > 0
        assert not any(type(m) is nn.Conv2d for m in on_cpu.modules())
        torch.testing.assert_close(on_cpu(pixels), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(expected.norm(dim=-1), torch.ones(4))
