"""The teacher: a frozen open_clip CLIP, built one way whatever its weights' origin.

Three sources, all through open_clip's own factory:
  (a) a built-in model name + pretrained tag (open_clip downloads the weights);
  (b) a built-in model name + a local checkpoint file;
  (c) a JSON model config (open_clip's model-config format) + a checkpoint file.
The wrapper stays in eval mode with gradients off, takes images in [0, 1] at its own
resolution and applies its own normalisation, and returns L2-normalised float32 embeddings.
Its `identity` (name and tag, or file names and sha256) is what the cache records.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.shards import sha256_file
from pipeline.views import normalize_pixels

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable cuda is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"option --device {name}: CUDA is not available here; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"option --device {name}: expected auto, cpu or cuda")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (e.g. AVX512-BF16 or AMX); else bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str = "bf16", cpu: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU and, with `cpu`, on CPUs with native bf16; otherwise full precision.

    Measured on this project's 2-core CPU (AVX512-BF16): the demo ViT teacher's forward runs
    2.2x faster in bf16 (embeddings within 3e-5 cosine of fp32), while ResNet-18 training runs
    slower, so the student never uses bf16 on CPU.
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (zip with a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def teacher_identity(config: TeacherConfig) -> str:
    """A string naming the teacher's architecture and weights, independent of directories.

    Computed without building the model, so stage two can check a cache against the params.
    """
    parts = []
    if config.config:
        path = existing(config.config, "--teacher-config")
        parts.append(f"config={path.name} sha256={sha256_file(path)}")
    elif config.model:
        parts.append(f"model={config.model}")
    else:
        raise PipelineError(
            "teacher: set --teacher-model (an open_clip name) or --teacher-config (a JSON file)"
        )
    if config.checkpoint:
        path = existing(config.checkpoint, "--teacher-checkpoint")
        parts.append(f"checkpoint={path.name} sha256={sha256_file(path)}")
    elif config.pretrained:
        if config.config:
            raise PipelineError("teacher: --teacher-pretrained needs --teacher-model, not a config")
        parts.append(f"pretrained={config.pretrained}")
    return " ".join(parts)


def existing(path: str, option: str) -> Path:
    resolved = Path(path)
    if not resolved.is_file():
        raise PipelineError(f"{path}: file not found (option {option})")
    return resolved


class Teacher:
    """A frozen CLIP: `encode_image` on [0, 1] pixels, `encode_text` on strings."""

    def __init__(self, model: torch.nn.Module, tokenizer, identity: str, device: torch.device,
                 precision: str = "bf16"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.precision = precision
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        preprocess = model.visual.preprocess_cfg
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(float(v) for v in preprocess["mean"])
        self.std = tuple(float(v) for v in preprocess["std"])
        self.embed_dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection")
                             and model.text_projection is not None else model.visual.output_dim)
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 views (or floats in [0, 1]) at `image_size` -> (B, D) unit-norm float32."""
        pixels = normalize_pixels(pixels.to(self.device, non_blocking=True), self._mean, self._std)
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision, cpu=True):
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Strings -> (N, D) unit-norm float32."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
            with autocast(self.device, self.precision, cpu=True):
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        if not chunks:
            return torch.empty(0, self.embed_dim)
        return torch.cat(chunks)


def build_model(config: TeacherConfig, allow_random: bool = False) -> tuple[torch.nn.Module, object]:
    """The open_clip model and tokenizer for a teacher config (weights loaded, on CPU)."""
    if config.config:
        path = existing(config.config, "--teacher-config")
        open_clip.add_model_config(path)  # registers the architecture under the file's stem
        name = path.stem
    elif config.model:
        name = config.model
        if name not in open_clip.list_models():
            raise PipelineError(
                f"--teacher-model {name}: not an open_clip model; see open_clip.list_models()"
            )
    else:
        raise PipelineError(
            "teacher: set --teacher-model (an open_clip name) or --teacher-config (a JSON file)"
        )
    tokenizer = open_clip.get_tokenizer(name)

    if config.checkpoint:
        checkpoint = existing(config.checkpoint, "--teacher-checkpoint")
        if is_torchscript_archive(checkpoint):
            # OpenAI's own files: open_clip rebuilds them with QuickGELU, as they were trained.
            log.info("%s is an OpenAI TorchScript archive: loading with QuickGELU", checkpoint)
            model = open_clip.load_openai_model(str(checkpoint), device="cpu", jit=False)
            return model, tokenizer
        if "openai" in checkpoint.name.lower() and "quickgelu" not in name.lower():
            raise PipelineError(
                f"{checkpoint}: OpenAI CLIP weights were trained with QuickGELU; use "
                f"--teacher-model {name}-quickgelu (or the original TorchScript file)"
            )
        try:
            model = open_clip.create_model(name, pretrained=str(checkpoint), device="cpu")
        except RuntimeError as err:
            raise PipelineError(
                f"{checkpoint}: does not fit model {name} ({str(err).splitlines()[0][:200]})"
            ) from None
        return model, tokenizer
    if config.pretrained:
        try:
            model = open_clip.create_model(name, pretrained=config.pretrained, device="cpu")
        except Exception as err:  # download or tag errors: report them in one line
            raise PipelineError(
                f"--teacher-pretrained {config.pretrained} for {name}: could not load "
                f"({str(err).splitlines()[0][:200]}); needs internet access, or pass "
                f"--teacher-checkpoint FILE"
            ) from None
        return model, tokenizer
    if not allow_random:
        raise PipelineError(
            f"teacher {name}: no weights given; set --teacher-pretrained or --teacher-checkpoint"
        )
    return open_clip.create_model(name, device="cpu"), tokenizer


def load_teacher(config: TeacherConfig, device: str = "auto", allow_random: bool = False,
                 precision: str = "bf16") -> Teacher:
    """Build the frozen teacher of `config` on `device` ('auto': cuda when available)."""
    target = resolve_device(device)
    model, tokenizer = build_model(config, allow_random=allow_random)
    identity = teacher_identity(config) if (config.checkpoint or config.pretrained) else (
        f"{teacher_identity(config)} weights=random")
    teacher = Teacher(model, tokenizer, identity, target, precision)
    log.info("teacher %s: image %dpx, embedding %d, on %s", identity, teacher.image_size,
             teacher.embed_dim, target)
    return teacher
