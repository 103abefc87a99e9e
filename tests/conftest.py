"""Shared fixtures: tiny shards, image folders and configs built from the project's params.yaml."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config, override

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
# The most the suite holds on disk at once under its temporary folder (measured: see
# docs/development.md); a test's folder goes when it passes (pyproject.toml), session fixtures stay.
DISK_NEEDED_GB = 3.0


def pytest_sessionstart(session):
    """Refuse to start on a disk the suite would fill: a full disk fails hundreds of tests at
    their fixtures with no word of why (seen on CI), and can hang the multi-process ones."""
    base = session.config._tmp_path_factory.getbasetemp()
    free = shutil.disk_usage(base).free / 1e9
    if free < DISK_NEEDED_GB:
        pytest.exit(f"the tests need about {DISK_NEEDED_GB:.0f} GB free under {base.parent} and "
                    f"{free:.1f} GB are; free some space or point --basetemp at a larger disk", returncode=2)


def pytest_collection_modifyitems(config, items):
    """`make test` is the quick suite: the tests marked slow (a minute or so each: multi-process, end to
    end, the GPU smoke script's CPU form) are deselected unless CSM_TESTS=all, which CI sets."""
    if os.environ.get("CSM_TESTS") == "all":
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
    if os.environ.get("CSM_TESTS") != "all":
        return "the quick suite: tests marked slow are left out (CSM_TESTS=all runs them, as CI does)"
    return "the whole suite (CSM_TESTS=all)"


def stage_config(stage: str, **changes):
    """The stage's config from params.yaml with dotted-key changes, e.g. {"train.epochs": 1}."""
    return override(load_config(stage, PARAMS), {k.replace("__", "."): v for k, v in changes.items()})


def make_demo_shards(out: Path, train: int = 96, val: int = 48, max_per_shard: int = 32,
                     seed: int = 0) -> Path:
    from stages import shards

    shards.run(stage_config("shards", source="demo", out=str(out), train=train, val=val,
                            max_per_shard=max_per_shard, seed=seed, workers=1))
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """96 train / 48 val demo images in shards of 32."""
    return make_demo_shards(tmp_path_factory.mktemp("demo") / "shards")


def write_image(path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    phase = rng.uniform(0, 6, size=3)
    pixels = (127 + 100 * np.sin(xx[..., None] / 7 + yy[..., None] / 11 + phase)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return pixels


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An ImageNet-style folder: two wnid classes, JPEG and PNG files, one corrupt file."""
    root = tmp_path / "images"
    for c, wnid in enumerate(["n02012849", "n03126707"]):
        for i in range(6):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
        write_image(root / wnid / f"{wnid}_extra.png", seed=100 + c, fmt="PNG")
    (root / "n03126707" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_teacher(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random open_clip CLIP saved as JSON config + safetensors (teacher path (c))."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip")
    weights = directory / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def precompute_config(shards: Path, out: Path, teacher: tuple[Path, Path], **changes):
    config, weights = teacher
    settings = {"shards": str(shards), "out": str(out), "metrics": str(out.parent / "precompute.json"),
                "teacher.config": str(config), "teacher.checkpoint": str(weights),
                "workers": 0, "batch_size": 64, "views": 4}
    settings.update({k.replace("__", "."): v for k, v in changes.items()})
    return override(load_config("precompute", PARAMS), settings)


def run_with_fault(args: list[str], fault: str, log: Path, **options) -> subprocess.CompletedProcess:
    """The command `args` run with CSM_DISTILL_FAULT=`fault` (pipeline.faults); `.stderr` is what it wrote
    there, through the file `log`: a DataLoader worker outlives its killed parent for a few seconds
    (until it notices), and would hold a pipe open, and the test waiting, as long."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stderr:
        result = subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300,
                                env={**os.environ, "CSM_DISTILL_FAULT": fault}, **options)
    result.stderr = log.read_text()
    return result
