"""The probe's memory budget: the formula against the bytes really held, and its ImageNet figure.

- stored features: float16, and exactly the bytes `probe_memory` counts (their storages);
- one fit: the peak resident memory of a fresh process on the CPU (and the CUDA allocator's
  peak where a GPU exists) lies between the float32 features alone and `fit_memory_bytes`;
- ImageNet (1.28 M train, 50 k val, ViT-L/14 teacher, ResNet-18 students, 1000 classes):
  host below 8 GiB, device below 16 GiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.features import centre_view_batch_bytes, centre_view_batches, extract_features
from pipeline.linear_probe import CHUNK_LOGIT_BYTES, default_chunk_rows, fit_memory_bytes, probe_memory
from pipeline.shards import iterate_batches, list_shards
from tests.conftest import ROOT

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
IMAGENET_DIMS = {"teacher": 768, "student": 512, "random_init": 512, "supervised": 512, "student_embedding": 768}
GiB = 2**30


def pooled(grid: int):
    """An encoder: the mean pixel of each cell of a grid x grid partition, 3 * grid^2 features."""
    return lambda pixels: F.adaptive_avg_pool2d(pixels.float() / 255, grid).flatten(1)


def test_stored_features_are_float16_and_take_the_bytes_of_the_budget(demo_shards):
    encoders = {"coarse": (16, pooled(2)), "fine": (24, pooled(4))}
    dims = {"coarse": 12, "fine": 48}
    splits = {}
    for split in ("train", "val"):
        shards = list_shards(demo_shards, split)
        splits[split] = extract_features(shards, encoders, 40, 0, split, torch.float16)
        wide, _, _ = extract_features(shards, encoders, 40, 0, split)
        for name, features in splits[split][0].items():
            assert features.dtype == torch.float16 and features.shape[1] == dims[name]
            assert torch.equal(features, wide[name].half())  # rounded once, in the same row order
    held = sum(tensor.untyped_storage().nbytes()
               for features, labels, _ in splits.values() for tensor in (*features.values(), labels))
    num_train, num_val = len(splits["train"][1]), len(splits["val"][1])
    assert (num_train, num_val) == (96, 48)
    budget = probe_memory(num_train, num_val, dims, 10, device="cpu")
    assert budget.features_bytes == held
    assert budget.largest == "fine"
    assert budget.host_bytes == held + fit_memory_bytes(num_train, 48, 10)


def test_loader_batch_bytes_are_the_bytes_a_worker_ships(demo_shards):
    """The shared-memory check's batch size: exactly the tensors of a full batch from a worker (a
    view per distinct resolution, positions and labels; keys and captions travel pickled)."""
    sizes = {"pixels_16": 16, "pixels_24": 24}
    batch = next(iterate_batches(centre_view_batches(list_shards(demo_shards, "train"), sizes, 8), 1))
    shipped = sum(value.untyped_storage().nbytes() for value in batch.values() if isinstance(value, torch.Tensor))
    assert len(batch["keys"]) == 8
    assert centre_view_batch_bytes([16, 24, 24], 8) == shipped == 8 * (3 * 16 * 16 + 3 * 24 * 24 + 16)


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from pipeline.linear_probe import linear_probe

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    n, d, c, v, rows = (int(a) for a in sys.argv[1:])
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(c, d, generator=generator)
    y, y_val = torch.randint(0, c, (n,), generator=generator), torch.randint(0, c, (v,), generator=generator)
    x = torch.empty(n, d, dtype=torch.float16)  # filled in chunks: no float32 copy before the fit
    for start in range(0, n, rows):
        x[start:start + rows] = centres[y[start:start + rows]] + 3 * torch.randn(len(y[start:start + rows]), d,
                                                                                 generator=generator)
    x_val = (centres[y_val] + 3 * torch.randn(v, d, generator=generator)).half()
    run = lambda: linear_probe(x, y, x_val, y_val, c, weight_decays=[1e-3], max_iter=3, chunk_rows=rows)
    run()  # the same fit once first: code pages mapped on first use are not the fit's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = status("VmRSS:")
    run()
    print(status("VmHWM:") - before)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS")
def test_fit_peak_resident_memory_is_within_the_budget():
    n, d, c, v, rows = 100_000, 256, 100, 5_000, 10_000
    # Fixed malloc thresholds: every large block is mapped and unmapped, so the resident size
    # follows the live tensors instead of what glibc keeps for reuse.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, (n, d, c, v, rows))], env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    peak = int(result.stdout.split()[-1])
    assert n * d * 4 <= peak <= fit_memory_bytes(n, d, c, chunk_rows=rows)


def test_imagenet_budget():
    on_cuda = probe_memory(IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_DIMS, IMAGENET_CLASSES, device="cuda")
    rows = IMAGENET_TRAIN + IMAGENET_VAL
    assert on_cuda.features_bytes == rows * 3072 * 2 + rows * 8  # float16 features, int64 labels
    assert on_cuda.largest == "teacher"
    assert on_cuda.fit_bytes >= IMAGENET_TRAIN * 768 * 4  # the teacher's float32 features
    assert on_cuda.host_bytes < 8 * GiB  # 7.63 GiB
    assert on_cuda.device_bytes < 16 * GiB  # 4.02 GiB
    # The logits of one chunk, not of all 1.28 M rows (4.8 GiB in float32).
    chunk_logits = default_chunk_rows(IMAGENET_CLASSES) * IMAGENET_CLASSES * 4
    assert chunk_logits <= CHUNK_LOGIT_BYTES < IMAGENET_TRAIN * IMAGENET_CLASSES * 4
    on_cpu = probe_memory(IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_DIMS, IMAGENET_CLASSES, device="cpu")
    assert on_cpu.host_bytes == on_cuda.features_bytes + on_cuda.fit_bytes < 12 * GiB  # 11.65 GiB
    assert on_cpu.device_bytes == 0
    assert on_cuda.describe() == ("probe memory: features 7.63 GiB (fp16, host), fit 4.02 GiB on cuda "
                                  "(teacher, the largest); peak host 7.63 GiB, cuda 4.02 GiB")
