"""MS-CLIP-S (You et al., ECCV 2022): one transformer shared by the image and text towers.

Written from the paper and from the key lists of the released checkpoints (every state_dict
name, shape and conv/norm setting, in tests/data/msclip/); no upstream code. The module names
follow the released checkpoints, so a file holding exactly their names loads strictly; the
module looks like an open_clip CLIP to the teacher (`encode_image`, `encode_text`,
`logit_scale`, `text_projection`, `visual.image_size`, `visual.output_dim`,
`visual.preprocess_cfg`).

The architecture:
- Sharing: in blocks 1..L-1 the image and text blocks at the same depth hold the same attention
  and MLP modules (one Parameter object under two state_dict names); each tower keeps its own
  LayerNorms. Text block 0 and every embedding, final norm and projection are per tower.
- Image block 0 is a convolutional stem (early specialisation): a 3x3 conv, BN, ReLU, then
  residual stages (3x3 conv + BN added to a 1x1 projection + BN, ReLU) and a closing 1x1 conv.
  Its output grid is the token grid; there is no patch-embedding conv (the patch size only
  sets the positional embedding's length).
- A parallel CNN branch (a conv stage, then bottleneck stages) runs on the same normalised
  image; before each listed image block a lateral adapter adds the branch map, shrunk to the
  token grid by a depthwise conv (kernel = stride), to a depthwise 3x3 conv of the token grid,
  and LayerNorms the sum, which replaces the token stream (the class token is added to itself).
- QuickGELU, causal text mask, text feature at the highest token id (end of text).

Shared tensors appear under both names in `state_dict()`, as in the released files. Saving one
with safetensors needs separate tensors per name: safetensors refuses shared storage, so cast
or clone each entry first (`v.to(torch.float16)` of an fp32 model copies).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import QuickGELU
from torch import nn

from pipeline.errors import PipelineError

ARCH_KIND = "ms-clip"  # the "arch" value of an MS-CLIP JSON config, and its identity's arch_kind
SHAREABLE = ("attn", "mlp")
STEM_BN_EPS = 1e-5  # the stem, the branch's first conv and the adapters: torch's default
BOTTLENECK_BN_EPS = 1e-6  # the branch's bottleneck stages (as in the released checkpoints)


@dataclass(frozen=True)
class MSCLIPConfig:
    """An MS-CLIP architecture; the defaults are MS-CLIP-S ViT-B/32."""
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32  # token grid = image_size // patch_size (the stem's strides must produce it)
    width: int = 768  # both towers: one shared transformer
    layers: int = 12  # image: the stem + layers - 1 blocks; text: layers blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    ln_eps: float = 1e-12
    stem_channels: tuple[int, ...] = (48, 96, 192, 384)  # first conv, then each stage's input; last stage -> width
    stem_strides: tuple[int, ...] = (2, 2, 2, 2, 2)  # first conv, then one per residual stage
    branch_channels: tuple[int, ...] = (48, 96, 192, 384, 768)  # per branch stage (first: a plain conv)
    branch_strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    lateral_layers: tuple[int, ...] = (2, 4, 6, 8, 10)  # image blocks preceded by adapter j (branch stage j)
    lateral_kernels: tuple[int, ...] = (16, 8, 4, 2, 1)  # = stride: branch grid j -> token grid
    shared: tuple[str, ...] = SHAREABLE  # modules of blocks 1..layers-1 the towers share

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> MSCLIPConfig:
        """A config from JSON values; `arch` must say ms-clip, `preprocess_cfg` is read by
        `preprocess_cfg`, any other unknown key is an error naming `source`."""
        if values.get("arch", ARCH_KIND) != ARCH_KIND:
            raise PipelineError(f"{source}: arch {values['arch']!r} is not {ARCH_KIND}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields) - {"arch", "preprocess_cfg"})
        if unknown:
            raise PipelineError(f"{source}: unknown MS-CLIP config keys {', '.join(unknown)} "
                                f"(known: {', '.join(fields)})")
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
        config = cls(**settings)
        problem = config.problem()
        if problem:
            raise PipelineError(f"{source}: not a consistent MS-CLIP config ({problem})")
        return config

    def problem(self) -> str:
        """What makes this architecture impossible to build, or ''."""
        if self.width % self.heads:
            return f"width {self.width} is not a multiple of heads {self.heads}"
        if self.image_size % self.patch_size:
            return f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
        if len(self.stem_strides) != len(self.stem_channels) + 1:
            return "stem_strides needs one stride more than stem_channels (the first conv's)"
        stem_grid = self.image_size
        for stride in self.stem_strides:
            stem_grid = conv_output_size(stem_grid, stride)
        if stem_grid != self.grid:
            return f"the stem's strides give a {stem_grid}x{stem_grid} grid, patch_size needs {self.grid}x{self.grid}"
        lateral = (self.branch_channels, self.branch_strides, self.lateral_layers, self.lateral_kernels)
        if len({len(v) for v in lateral}) != 1:
            return "branch_channels, branch_strides, lateral_layers and lateral_kernels differ in length"
        if list(self.lateral_layers) != sorted(set(self.lateral_layers)) or not all(
                1 <= layer < self.layers for layer in self.lateral_layers):
            return f"lateral_layers must rise within 1..{self.layers - 1}"
        branch_grid = self.image_size
        for stage, (stride, kernel) in enumerate(zip(self.branch_strides, self.lateral_kernels, strict=True)):
            branch_grid = conv_output_size(branch_grid, stride)
            if branch_grid != self.grid * kernel:
                return (f"branch stage {stage} gives {branch_grid}x{branch_grid}, which lateral kernel {kernel} "
                        f"does not map onto the {self.grid}x{self.grid} token grid")
        if not set(self.shared) <= set(SHAREABLE):
            return f"shared may name only {', '.join(SHAREABLE)}"
        return ""


def conv_output_size(size: int, stride: int) -> int:
    """Side of a 3x3 pad-1 (or 1x1 pad-0) conv's output at `stride`."""
    return (size - 1) // stride + 1


MSCLIP_CONFIGS = {
    "MS-CLIP-S-B-32": MSCLIPConfig(),
    "MS-CLIP-S-B-16": MSCLIPConfig(patch_size=16, stem_strides=(2, 2, 2, 2, 1), branch_strides=(2, 2, 2, 2, 1),
                                   lateral_kernels=(8, 4, 2, 1, 1)),
}


def preprocess_cfg(config: MSCLIPConfig, overlay: dict[str, Any] | None = None) -> dict[str, Any]:
    """open_clip's preprocess config: MS-CLIP's eval transform (ImageNet mean/std, bicubic resize
    of the shorter side, centre crop) at the model's size, under a config's `preprocess_cfg`."""
    defaults = PreprocessCfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    resolved = merge_preprocess_dict(defaults, {**(overlay or {}), "size": config.image_size})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


# --- the convolutional parts ---------------------------------------------------------------


class ConvNorm(nn.Module):
    """A bias-free conv, optionally followed by BatchNorm and ReLU (`conv`, `bn` in the checkpoints)."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, norm: bool = True, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(channels_out, eps=STEM_BN_EPS) if norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class StemBlock(nn.Module):
    """relu(BN(3x3 conv) + BN(1x1 projection)): one residual stage of the stem."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out, eps=STEM_BN_EPS)
        self.downsample = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                        nn.BatchNorm2d(channels_out, eps=STEM_BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)) + self.downsample(x))


class ConvStem(nn.Module):
    """Image block 0: pixels (N, 3, S, S) -> (N, width, grid, grid)."""

    def __init__(self, config: MSCLIPConfig):
        super().__init__()
        channels = (*config.stem_channels, config.width)
        self.conv1 = nn.Conv2d(3, channels[0], 3, config.stem_strides[0], 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0], eps=STEM_BN_EPS)
        self.resnet_stage = nn.Sequential(OrderedDict(
            (f"conv_{i}", StemBlock(channels[i], channels[i + 1], stride))
            for i, stride in enumerate(config.stem_strides[1:])))
        self.last_conv = nn.Conv2d(config.width, config.width, 1, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.last_conv(self.resnet_stage(F.relu(self.bn1(self.conv1(pixels)))))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 at the input's width, plus a strided 1x1 projection; ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_in, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_in, eps=BOTTLENECK_BN_EPS)
        self.conv2 = nn.Conv2d(channels_in, channels_in, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_in, eps=BOTTLENECK_BN_EPS)
        self.conv3 = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels_out, eps=BOTTLENECK_BN_EPS)
        self.residual_conv = nn.Conv2d(channels_in, channels_out, 1, stride, bias=False)
        self.residual_bn = nn.BatchNorm2d(channels_out, eps=BOTTLENECK_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.residual_bn(self.residual_conv(x)))


class BranchStage(nn.Module):
    """A bottleneck stage of the parallel branch (`resnet_stage.conv_0` in the checkpoints)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.resnet_stage = nn.Sequential(OrderedDict(conv_0=Bottleneck(channels_in, channels_out, stride)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet_stage(x)


class LateralAdapter(nn.Module):
    """Branch map + token grid -> new tokens: LN(pw(dw_k(branch)) + dw_3x3(grid)); class token: LN(2 cls)."""

    def __init__(self, branch_channels: int, width: int, kernel: int, ln_eps: float):
        super().__init__()
        self.top2bottom_dw_conv = ConvNorm(branch_channels, branch_channels, kernel, kernel,
                                           groups=branch_channels)
        self.top2bottom_pw_conv = ConvNorm(branch_channels, width, 1, norm=False)
        self.bottom_dw_conv = ConvNorm(width, width, 3, padding=1, groups=width)
        self.ln_adapt = nn.LayerNorm(width, eps=ln_eps)

    def forward(self, branch: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n, length, width = tokens.shape
        grid = math.isqrt(length - 1)
        from_branch = self.top2bottom_pw_conv(self.top2bottom_dw_conv(branch)).flatten(2).transpose(1, 2)
        token_map = tokens[:, 1:].transpose(1, 2).reshape(n, width, grid, grid)
        from_tokens = self.bottom_dw_conv(token_map).flatten(2).transpose(1, 2)
        class_token = tokens[:, :1]
        return self.ln_adapt(torch.cat([class_token + class_token, from_tokens + from_branch], dim=1))


# --- the transformer -----------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with torch's MultiheadAttention parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = (F.linear(x, self.in_proj_weight, self.in_proj_bias)
                   .view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(attended.transpose(1, 2).reshape(n, length, width))


def mlp(width: int, ratio: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=QuickGELU(),
                                     c_proj=nn.Linear(hidden, width)))


class Block(nn.Module):
    """Pre-norm residual block; `attn` and `mlp` may be another tower's modules (shared)."""

    def __init__(self, config: MSCLIPConfig, attn: Attention | None = None, mlp_module: nn.Module | None = None):
        super().__init__()
        self.attn = attn or Attention(config.width, config.heads)
        self.ln_1 = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.mlp = mlp_module or mlp(config.width, config.mlp_ratio)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.ln_eps)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """`resblocks`: the stem, then blocks 1..L-1; the parallel branch and its lateral adapters."""

    def __init__(self, config: MSCLIPConfig):
        super().__init__()
        self.lateral_layers = config.lateral_layers
        self.resblocks = nn.ModuleList([ConvStem(config), *(Block(config) for _ in range(1, config.layers))])
        channels = config.branch_channels
        self.parallel_branch_v = nn.ModuleList(
            ConvNorm(3, channels[0], 3, config.branch_strides[0], 1, relu=True) if j == 0 else
            BranchStage(channels[j - 1], channels[j], config.branch_strides[j]) for j in range(len(channels)))
        self.parallel_lateral_adapter = nn.ModuleList(
            LateralAdapter(c, config.width, k, config.ln_eps)
            for c, k in zip(channels, config.lateral_kernels, strict=True))

    @property
    def stem(self) -> ConvStem:
        return self.resblocks[0]

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        branch, stage = pixels, 0
        for index, block in enumerate(self.resblocks[1:], start=1):
            if index in self.lateral_layers:
                # the branch map goes on to the next stage unchanged; the adapter's output replaces the tokens
                branch = self.parallel_branch_v[stage](branch)
                tokens = self.parallel_lateral_adapter[stage](branch, tokens)
                stage += 1
            tokens = block(tokens)
        return tokens


class VisionTower(nn.Module):
    def __init__(self, config: MSCLIPConfig):
        super().__init__()
        scale = config.width ** -0.5
        self.image_size = (config.image_size, config.image_size)
        self.output_dim = config.embed_dim
        self.preprocess_cfg = preprocess_cfg(config)
        self.class_embedding = nn.Parameter(scale * torch.randn(config.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid ** 2 + 1, config.width))
        self.proj = nn.Parameter(scale * torch.randn(config.width, config.embed_dim))
        self.ln_pre = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.transformer = VisualTransformer(config)
        self.ln_post = nn.LayerNorm(config.width, eps=config.ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.transformer.stem(pixels).flatten(2).transpose(1, 2)
        class_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([class_token, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x, pixels)
        return self.ln_post(x[:, 0]) @ self.proj


class TextTransformer(nn.Module):
    def __init__(self, config: MSCLIPConfig, visual: VisualTransformer):
        super().__init__()
        shared = set(config.shared)
        self.resblocks = nn.ModuleList([Block(config)])
        for image_block in visual.resblocks[1:]:
            self.resblocks.append(Block(config, image_block.attn if "attn" in shared else None,
                                        image_block.mlp if "mlp" in shared else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=True)
        return x


class MSCLIP(nn.Module):
    """MS-CLIP with open_clip's CLIP interface; outputs of `encode_*` are not normalised."""

    def __init__(self, config: MSCLIPConfig):
        super().__init__()
        problem = config.problem()
        if problem:
            raise ValueError(f"MS-CLIP config: {problem}")
        self.config = config
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.visual = VisionTower(config)
        self.transformer = TextTransformer(config, self.visual.transformer)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.ln_final = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.init_parameters()

    def init_parameters(self) -> None:
        """CLIP's initialisation of the transformer (OpenAI's), torch's defaults for convs and norms."""
        width, blocks = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        projection_std = width ** -0.5 * (2 * blocks) ** -0.5
        for module in self.modules():  # each shared block once
            if isinstance(module, Attention):
                nn.init.normal_(module.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(module.out_proj.weight, std=projection_std)
                nn.init.zeros_(module.out_proj.bias)
            elif isinstance(module, Block):
                nn.init.normal_(module.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(module.mlp.c_proj.weight, std=projection_std)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        features = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the logit scale's exp(), as open_clip's CLIP returns."""
        return self.encode_image(image, normalize=True), self.encode_text(text, normalize=True), self.logit_scale.exp()


def shared_names(model: nn.Module) -> list[list[str]]:
    """The state_dict names that hold one tensor, in groups (names in state_dict order)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
