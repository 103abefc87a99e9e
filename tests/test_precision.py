"""The arithmetic chosen per device (pure functions, so the GPU branches run here), the GPU a
process takes, and what a run logs about both."""

from __future__ import annotations

import pytest
import torch

from pipeline import distributed, precision
from pipeline.errors import PipelineError

# (device type, bf16 native, TF32 native): an H100/A100, a V100/T4, a CPU with and without native bf16
AMPERE, VOLTA, CPU_BF16, CPU = ("cuda", True, True), ("cuda", False, False), ("cpu", True, False), ("cpu", False, False)


@pytest.mark.parametrize(("requested", "device", "dtype", "scaler", "tf32", "name"), [
    ("bf16", AMPERE, torch.bfloat16, False, True, "bf16"),
    ("bf16", VOLTA, torch.float16, True, False, "fp16"),  # bf16 is emulated there: fp16 with loss scaling
    ("fp16", AMPERE, torch.float16, True, True, "fp16"),
    ("tf32", AMPERE, None, False, True, "tf32"),
    ("tf32", VOLTA, None, False, False, "fp32"),  # no TF32 units
    ("fp32", AMPERE, None, False, False, "fp32"),  # TF32 off explicitly: PyTorch leaves cuDNN on it
    ("bf16", CPU_BF16, torch.bfloat16, False, False, "bf16"),
    ("bf16", CPU, None, False, False, "fp32"),
    ("fp16", CPU_BF16, None, False, False, "fp32"),
    ("tf32", CPU_BF16, None, False, False, "fp32"),
])
def test_the_arithmetic_follows_what_the_device_does_natively(requested, device, dtype, scaler, tf32, name):
    chosen = precision.choose(requested, *device)
    assert (chosen.autocast_dtype, chosen.scaler, chosen.tf32, chosen.name) == (dtype, scaler, tf32, name)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'int8'"):
        precision.choose("int8", "cuda", True, True)


def test_configure_sets_tf32_and_autotuning_explicitly():
    try:
        precision.configure(precision.choose("tf32", *AMPERE), training=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        precision.configure(precision.choose("fp32", *AMPERE), training=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
    finally:
        precision.configure(precision.choose("fp32", *CPU))


def test_the_grad_scaler_is_enabled_only_for_fp16_on_cuda():
    assert not precision.grad_scaler(precision.choose("bf16", *CPU_BF16), torch.device("cpu")).is_enabled()
    assert not precision.grad_scaler(precision.choose("bf16", *VOLTA), torch.device("cpu")).is_enabled()


@pytest.mark.parametrize(("local_rank", "count", "index"), [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)])
def test_each_process_takes_its_gpu_even_when_the_launcher_masks_them(local_rank, count, index):
    """torchrun shows all GPUs (local rank i -> GPU i); SLURM --gpus-per-task=1 shows one (index 0)."""
    assert distributed.device_index(local_rank, count) == index


def test_no_visible_gpu_is_one_line():
    with pytest.raises(PipelineError, match="no CUDA device is visible to this process"):
        distributed.device_index(0, 0)


def test_the_local_world_size_comes_from_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.this_process() == distributed.Process(rank=9, world=16, local_rank=1, local_world=8)
