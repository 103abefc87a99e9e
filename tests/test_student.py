"""MatmulConv2d / student_on: the CPU's matrix-product convolution is the same convolution."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.student import MATMUL_CONV_MAX_POSITIONS, MatmulConv2d, Student, build_student, student_on

# (in, out, kernel, stride, padding, dilation, bias, input size): outputs of 1 to 4 positions,
# and two above MATMUL_CONV_MAX_POSITIONS (the nn.Conv2d path).
CASES = [
    (8, 6, 3, 1, 1, 1, True, (2, 2)),    # ResNet layer4 at 64 px: 3 x 3 on 2 x 2
    (8, 6, 3, 2, 1, 1, False, (4, 4)),   # its stride-2 entry: 4 x 4 -> 2 x 2
    (8, 6, 1, 2, 0, 1, False, (3, 4)),   # the 1 x 1 downsample, a non-square map -> 2 x 2
    (5, 7, 3, 1, 2, 2, True, (1, 2)),    # dilation; 1 x 2 output
    (8, 6, 3, 1, 1, 1, True, (1, 1)),    # one position
    (8, 6, 3, 1, 1, 1, True, (4, 4)),    # 16 positions: nn.Conv2d's own path
    (8, 6, 3, 2, 1, 1, False, (8, 8)),
]


def pair(case, channels_last: bool):
    """An nn.Conv2d and a MatmulConv2d with the same parameters, and an input."""
    c_in, c_out, k, s, p, d, bias, size = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias)
    matmul = copy.deepcopy(conv)
    matmul.__class__ = MatmulConv2d
    x = torch.randn(3, c_in, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return conv, matmul, x


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matmul_conv_equals_conv_with_gradients_in_float32(case, channels_last):
    conv, matmul, x = pair(case, channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = conv(xa), matmul(xb)
    assert ya.shape == yb.shape and yb.dtype == torch.float32
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-5)
    if conv.bias is not None:
        torch.testing.assert_close(matmul.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:3])
def test_matmul_conv_under_bf16_autocast_is_as_accurate_as_the_bf16_convolution(case):
    """Output, input gradient and weight gradient under bf16 autocast, each against float32:
    MatmulConv2d's error is no larger than nn.Conv2d's (the input gradient's overlapping terms
    are summed in float32 by both)."""
    conv, matmul, x = pair(case, channels_last=True)
    grad = torch.randn(x.shape[0], conv.out_channels, 2, 2)

    def run(module, bf16: bool):
        module.zero_grad()
        inp = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(inp)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        out.float().backward(grad)
        return out.float(), inp.grad, module.weight.grad.clone()

    exact = run(conv, bf16=False)
    errors = {name: [float((a - b).norm() / b.norm()) for a, b in zip(run(module, bf16=True), exact, strict=True)]
              for name, module in (("conv", conv), ("matmul", matmul))}
    for conv_error, matmul_error in zip(errors["conv"], errors["matmul"], strict=True):
        assert 0 < matmul_error <= 1.1 * conv_error, errors  # > 0: bf16 did run
        assert matmul_error < 1e-2, errors


def test_student_on_the_cpu_swaps_only_the_convolutions_and_keeps_outputs_and_state():
    torch.manual_seed(0)
    reference = Student("resnet18", 16, head="mlp", head_hidden=32).eval()
    model = student_on(copy.deepcopy(reference), torch.device("cpu"))
    swapped = [name for name, m in model.named_modules() if isinstance(m, MatmulConv2d)]
    assert len(swapped) == sum(isinstance(m, nn.Conv2d) for m in reference.modules()) == 20
    assert model.state_dict().keys() == reference.state_dict().keys()
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    layer4_shapes = []
    model.backbone.layer4.register_forward_hook(lambda module, inputs, out: layer4_shapes.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference(pixels), rtol=1e-4, atol=1e-5)
    # at 64 px, layer4 has 2 x 2 maps: the positions MatmulConv2d computes as a matrix product
    assert layer4_shapes[0][-2:].numel() <= MATMUL_CONV_MAX_POSITIONS
    # a checkpoint of the swapped model loads into a plain one, with the same outputs
    fresh = build_student({"arch": "resnet18", "out_dim": 16, "head": "mlp", "head_hidden": 32,
                           "normalize_output": True}).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixels), reference(pixels))
