"""The student: a torchvision or timm classification backbone with a projection head.

`arch` names the backbone: a torchvision model (`resnet18`), or a timm model behind the prefix
`timm/` (`timm/mobilenetv3_small_100`), built with random weights and no classifier. The
backbone's classifier is replaced by a head: a projection into the teacher's embedding space
(`linear`; `mlp`, Linear-BN-ReLU-Linear; `clip-mlp`, open_clip's timm projection), L2-normalised,
for CSM; or a plain linear classifier for the supervised reference. Input normalisation lives
inside the module, so a checkpoint is self-contained: it takes images in [0, 1] (or uint8 views)
at its resolution. It is ImageNet's mean and std for every arch, timm's included (not the timm
model's own `pretrained_cfg` mean and std): the views a cache stores are the same for all
students, and a student starts from random weights, trained on that normalisation.

State_dict keys, for export: `backbone.*` is the torchvision or timm model's own state_dict (a
torchvision ResNet's loads into timm's ResNet of the same name, `strict=True`, with the same
features; timm's is what open_clip's `TimmModel` holds as `trunk.*`); `head.*` is `head.weight`,
`head.bias` (linear), `head.0.*`, `head.1.*`, `head.3.*` (mlp: Linear, BatchNorm1d, Linear), or
`head.mlp.fc1.*`, `head.mlp.fc2.*` (clip-mlp: open_clip's `TimmModel.head` with `proj="mlp"`,
`proj_bias=True`, key for key); `mean` and `std` are the normalisation buffers.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import Mlp
from torch import nn

from pipeline.atomic import write_bytes
from pipeline.errors import PipelineError, reason
from pipeline.views import normalize_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm/"  # `--arch timm/NAME`: timm's model NAME; any other arch is torchvision's
HEADS = ("linear", "mlp", "clip-mlp")
SSL_HEADS = ("simclr", "byol")  # the SSL baselines' projection heads (lightly's; not distill options)


def backbone_without_classifier(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised backbone without its classifier (pooled features out); their width."""
    if arch.startswith(TIMM_PREFIX):
        return timm_backbone(arch)
    return torchvision_backbone(arch)


def torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision model whose last Linear is an Identity; its width."""
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise PipelineError(
            f"option --arch {arch}: not a torchvision model; see torchvision.models.list_models()"
        ) from None
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise PipelineError(f"option --arch {arch}: has no final Linear classifier to replace")
    parent = model
    *path, leaf = last_name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, nn.Identity())
    return model, last.in_features


def timm_backbone(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised timm model built with `num_classes=0` (pooled features out); its width."""
    name = arch.removeprefix(TIMM_PREFIX)
    # checked first: timm.create_model would also accept hub names (`hf-hub:...`) and fetch them
    if not timm.is_model(name):
        raise PipelineError(f"option --arch {arch}: not a timm model; see timm.list_models()")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return model, pooled_width(model, arch)


def pooled_width(model: nn.Module, arch: str) -> int:
    """The width of what a timm model without classifier returns, measured on one blank image.

    Not `num_features`: that is the width before a model's own head layers, which `num_classes=0`
    keeps (MobileNetV3's pooled 576 channels go through a 1 x 1 convolution to 1,024). In eval
    mode and from zeros, so that neither BatchNorm statistics nor the random generator move.
    """
    training = model.training
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, *model.pretrained_cfg["input_size"]))
    model.train(training)
    if out.ndim != 2:
        raise PipelineError(f"option --arch {arch}: returns {tuple(out.shape[1:])} per image without its "
                            f"classifier, not pooled features; pick a model with global pooling")
    return out.shape[1]


def projection_head(kind: str, in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    """The head named by `--head`; `hidden` is the mlp's width (clip-mlp's is 2 x out_dim)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, out_dim))
    if kind == "clip-mlp":
        # open_clip's TimmModel head for `timm_proj: mlp, timm_proj_bias: true` (dropout 0), the same
        # module under the same name: Linear(in, 2 out) - GELU (exact) - Linear(2 out, out), with biases
        return nn.Sequential(OrderedDict(mlp=Mlp(in_dim, 2 * out_dim, out_dim, bias=(True, True))))
    if kind in SSL_HEADS:
        return ssl_head(kind, in_dim, out_dim, hidden)
    raise PipelineError(f"option --head {kind}: expected one of {', '.join(HEADS)}")


def ssl_head(kind: str, in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    """The projection head of an SSL baseline (pipeline/ssl.py), as lightly builds it: SimCLR's
    Linear-BN-ReLU-Linear-BN, BYOL's Linear-BN-ReLU-Linear."""
    try:
        from lightly.models.modules import BYOLProjectionHead, SimCLRProjectionHead
    except ImportError as err:
        raise PipelineError(f"a {kind} baseline needs lightly ({err}); pip install -e '.[ssl]'") from None
    head = SimCLRProjectionHead if kind == "simclr" else BYOLProjectionHead
    return head(in_dim, hidden, out_dim)


class Student(nn.Module):
    """backbone -> pooled features -> head. `normalize_output` for CSM embeddings."""

    def __init__(self, arch: str, out_dim: int, head: str = "mlp", head_hidden: int = 512,
                 normalize_output: bool = True) -> None:
        super().__init__()
        self.backbone, self.feature_dim = backbone_without_classifier(arch)
        self.head = projection_head(head, self.feature_dim, out_dim, head_hidden)
        self.normalize_output = normalize_output
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (before the head) of uint8 views or images in [0, 1]."""
        return self.backbone(normalize_pixels(pixels, self.mean, self.std))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The head's output for pooled features (what `forward` returns for their pixels)."""
        out = self.head(features)
        return F.normalize(out, dim=-1) if self.normalize_output else out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(pixels))


#: On the CPU, convolutions with at most this many output positions run as one matrix product
#: (MatmulConv2d). Measured (ResNet-18 training step at 64 px, batch 64, 2 threads, bf16): 2 x 2
#: outputs (layer4) as matrix products 424 images/s against 305 for oneDNN's convolutions; with
#: layer3's 4 x 4 as well 355, with layer2's 8 x 8 too 266 (those two with an earlier version that
#: unfolded in bf16, 410 images/s at this line). Larger maps (e.g. layer4 at 224 px: 7 x 7) stay
#: convolutions.
MATMUL_CONV_MAX_POSITIONS = 4


class MatmulConv2d(nn.Conv2d):
    """An nn.Conv2d that computes a tiny output on the CPU as im2col and one matrix product.

    oneDNN's convolution backward is slow for feature maps of a few positions on the CPU: a
    3 x 3, 512 -> 512 convolution on 2 x 2 maps (ResNet-18's layer4 at 64 px) takes 34 ms for
    forward and backward at batch 64 in bf16, against 11 ms as `F.unfold` followed by one GEMM
    of (batch x positions) rows. The result is the same convolution (equal to float32
    rounding in float32; the same bf16 inputs and float32 accumulation under autocast).
    Parameters and state_dict are nn.Conv2d's. Anything else (other devices, outputs of more
    than MATMUL_CONV_MAX_POSITIONS positions, groups, padding modes other than zeros, TorchScript)
    runs nn.Conv2d's own convolution.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (x.device.type != "cpu" or x.ndim != 4 or self.groups != 1 or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or torch.jit.is_scripting() or torch.jit.is_tracing()):
            return super()._conv_forward(x, weight, bias)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if out_h * out_w > MATMUL_CONV_MAX_POSITIONS:
            return super()._conv_forward(x, weight, bias)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        # unfolded in x's dtype, cast after: the input gradient's overlapping terms are summed
        # (F.fold) in float32, not bf16, as oneDNN's convolution backward sums them
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        rows = columns.transpose(1, 2).reshape(x.shape[0] * out_h * out_w, -1).to(dtype)  # a row per position
        kernel = weight.to(dtype).reshape(self.out_channels, -1).T
        out = rows @ kernel if bias is None else torch.addmm(bias.to(dtype), rows, kernel)
        return out.view(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)  # channels_last


def student_on(model: Student, device: torch.device) -> Student:
    """`model` on `device` as it runs fastest there: channels_last (a ResNet-18 forward at 64 px
    runs 1,620 images/s in bf16 with it, 980 without, on this project's 2-core CPU) and, on the
    CPU, its convolutions as MatmulConv2d (same parameters; the module is changed in place)."""
    if torch.device(device).type == "cpu":
        for module in model.modules():
            if type(module) is nn.Conv2d:
                module.__class__ = MatmulConv2d  # no new state: the same parameters and buffers
    return model.to(device, memory_format=torch.channels_last)


def student_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Views or images (uint8 or [0, 1]) as a Student takes them: on `device`, channels_last, the
    memory format its convolutions run fastest in (`student_on`). `normalize_pixels` keeps it."""
    return pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def student_spec(model_config: dict[str, Any]) -> dict[str, Any]:
    """The keys a checkpoint needs to rebuild its Student."""
    return {k: model_config[k] for k in ("arch", "out_dim", "head", "head_hidden", "normalize_output")}


def build_student(spec: dict[str, Any]) -> Student:
    return Student(spec["arch"], spec["out_dim"], spec["head"], spec["head_hidden"],
                   spec["normalize_output"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save under a temporary name, then an atomic rename: never a half-written file."""
    # serialised in memory, then written as bytes: a full disk is a plain failed write (one line)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getbuffer())


def load_student(path: str | Path) -> tuple[Student, dict[str, Any]]:
    """A student checkpoint (as written by distill or supervised) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: student checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = build_student(checkpoint["model"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError, OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
        # weights_only=True: a pickle that would run code is refused here, never executed
        raise PipelineError(f"{path}: not a student checkpoint ({reason(err)})") from None
    return model.eval(), checkpoint
