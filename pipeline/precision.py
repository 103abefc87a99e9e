"""What arithmetic a model runs in, chosen from what the device does natively.

`--precision` names what the user wants; `choose` turns it into what runs on a device, as a
pure function of the request and of the device's native support (tested on its inputs, so
the GPU branches are exercised on a CPU):

- `bf16` (the default): mixed precision. bf16 autocast where the device runs bf16 natively
  (CUDA compute capability 8.0+: A100, H100, L4, RTX 30xx+; CPUs with AVX512-BF16 or AMX);
  on GPUs without it (V100, T4: bf16 is emulated there, no tensor cores, no cuDNN bf16
  convolutions) fp16 autocast with a `torch.amp.GradScaler` instead; fp32 on other CPUs.
  The float32 operations left outside autocast use TF32 where the GPU has it.
- `fp16`: fp16 autocast with a GradScaler on CUDA (fp32 on a CPU).
- `tf32`: float32 weights and activations, matrix products and convolutions on TF32 tensor
  cores (CUDA 8.0+; fp32 elsewhere). About 10 mantissa bits, as fast as bf16 for convolutions.
- `fp32`: full precision everywhere: TF32 is switched off explicitly, because PyTorch's
  default leaves cuDNN convolutions on TF32 on Ampere and later GPUs.

`configure` applies a choice to the process-wide backend switches (TF32, cuDNN autotuning,
deterministic algorithms) and `autocast` gives the context a forward runs under.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

CHOICES = ("bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True)
class Precision:
    """The arithmetic chosen for one device: autocast dtype (None: none), loss scaling, TF32."""

    requested: str
    autocast_dtype: torch.dtype | None
    scaler: bool  # fp16 gradients underflow without loss scaling
    tf32: bool  # float32 matmuls and convolutions on TF32 tensor cores

    @property
    def name(self) -> str:
        """What really runs, as recorded in a cache identity and logged: bf16, fp16, tf32 or fp32."""
        if self.autocast_dtype is not None:
            return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        return "tf32" if self.tf32 else "fp32"


def choose(requested: str, device_type: str, bf16_native: bool, tf32_native: bool) -> Precision:
    """The arithmetic for `requested` on a device of `device_type` ('cuda' or 'cpu') with the
    given native support (`native_support` reads it from a real device)."""
    if requested not in CHOICES:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(CHOICES)}")
    if device_type == "cuda":
        if requested == "bf16" and bf16_native:
            return Precision(requested, torch.bfloat16, scaler=False, tf32=tf32_native)
        if requested in ("bf16", "fp16"):
            return Precision(requested, torch.float16, scaler=True, tf32=tf32_native)
        return Precision(requested, None, scaler=False, tf32=requested == "tf32" and tf32_native)
    if requested == "bf16" and bf16_native:
        return Precision(requested, torch.bfloat16, scaler=False, tf32=False)
    return Precision(requested, None, scaler=False, tf32=False)  # no fp16 nor TF32 arithmetic on CPUs


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (e.g. AVX512-BF16 or AMX); else bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_support(device: torch.device) -> tuple[bool, bool]:
    """(bf16 native, TF32 native) on `device`: CUDA compute capability 8.0+ for both (not
    `torch.cuda.is_bf16_supported()`, which also says yes where bf16 is emulated)."""
    if device.type == "cuda":
        ampere = torch.cuda.get_device_capability(device) >= (8, 0)
        return ampere, ampere
    if device.type == "cpu":
        return cpu_has_native_bf16(), False
    return False, False


def for_device(requested: str, device: torch.device) -> Precision:
    return choose(requested, device.type, *native_support(device))


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast_dtype)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only where fp16 needs it (disabled, its calls pass through)."""
    return torch.amp.GradScaler(device.type, enabled=precision.scaler and device.type == "cuda")


def configure(precision: Precision, training: bool = False, deterministic: bool = False) -> None:
    """Set the process-wide switches for `precision`: TF32 on or off explicitly (both the
    matmul and the cuDNN switch), cuDNN autotuning for training (a fixed input shape per run,
    so `benchmark` pays once), and with `deterministic`, deterministic algorithms.

    `deterministic` makes CUDA runs repeat bit for bit on the same GPU and software, at some
    speed: `torch.use_deterministic_algorithms(True)` (an op without a deterministic kernel is
    an error), no cuDNN autotuning, and cuBLAS's fixed workspace (`CUBLAS_WORKSPACE_CONFIG`,
    which must be set before cuBLAS starts: call this before the first matmul). On CPUs the
    stages are deterministic without it.
    """
    torch.backends.cuda.matmul.allow_tf32 = precision.tf32
    torch.backends.cudnn.allow_tf32 = precision.tf32
    torch.backends.cudnn.benchmark = training and not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
