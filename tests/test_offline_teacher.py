"""A teacher named by an open_clip tag, on a machine without the hub.

Each case runs in a fresh process, with huggingface_hub's cache and endpoint set in its
environment (huggingface_hub reads them when it is imported): an empty cache and an endpoint
on a closed local port (what a machine without internet sees, but refused at once and the
same on every machine), or HF_HUB_OFFLINE=1; and a cache holding the tag's file, as open_clip
leaves it after a download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from pipeline.shards import sha256_file
from tests.conftest import ROOT

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
TAG = ("ViT-B-32-quickgelu", "openai")
HUB_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip's pretrained config for the tag points
TAG_OPTIONS = ["--teacher-model", TAG[0], "--teacher-pretrained", TAG[1], "--teacher-checkpoint", "",
               "--teacher-config", ""]


def hub_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": CLOSED_PORT, **extra}


def test_precompute_without_the_hub_fails_in_seconds_in_one_line(demo_shards, tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "precompute", "--shards", str(demo_shards),
                             "--out", str(tmp_path / "teacher.h5"), *TAG_OPTIONS], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=hub_env(tmp_path / "hub"))
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"error: --teacher-pretrained openai for {TAG[0]}: its weights (hf-hub:{HUB_REPO}/) are not in the local "
        f"download cache and 127.0.0.1:9 cannot be reached (Connection refused); on a machine without internet "
        f"pass --teacher-checkpoint FILE (the weights copied from a machine with internet: OpenAI's own .pt file, "
        f"or the file open_clip downloaded there)")
    assert seconds < 30, seconds  # the interpreter and torch start-up, not a download's retries
    assert not (tmp_path / "teacher.h5").exists() and not (tmp_path / "hub").exists()


def test_hf_hub_offline_is_honoured_before_any_connection(tmp_path):
    script = ("from pipeline.config import TeacherConfig\nfrom pipeline.errors import PipelineError\n"
              "from pipeline.teacher import load_teacher\n"
              f"try:\n    load_teacher(TeacherConfig(model={TAG[0]!r}, pretrained={TAG[1]!r}, checkpoint='', "
              "config=''), 'cpu')\nexcept PipelineError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=hub_env(tmp_path / "hub", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert "are not in the local download cache and HF_HUB_OFFLINE is set; on a machine without internet pass " \
           "--teacher-checkpoint FILE" in result.stdout


def write_hub_file(cache: Path, weights: dict[str, torch.Tensor]) -> Path:
    """The tag's file where huggingface_hub keeps a download: models--ORG--NAME/snapshots/REV/FILE."""
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    path = repo / "snapshots" / revision / "open_clip_model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(weights, str(path))
    return path


def test_a_downloaded_tag_loads_offline_and_is_identified_by_its_content(tmp_path):
    """With the tag's file in the hub cache, the teacher loads without a connection; its identity
    holds the file's sha256, so the same file given as --teacher-checkpoint is the same teacher."""
    torch.manual_seed(0)
    model = open_clip.create_model(TAG[0])
    weights = {k: v.half().contiguous() for k, v in model.state_dict().items()}  # fp16: half the bytes
    path = write_hub_file(tmp_path / "hub", weights)
    script = (
        "import json, torch\nfrom pipeline.config import TeacherConfig\n"
        "from pipeline.teacher import identity_difference, load_teacher, teacher_identity\n"
        f"tag = TeacherConfig(model={TAG[0]!r}, pretrained={TAG[1]!r}, checkpoint='', config='')\n"
        f"file = TeacherConfig(model={TAG[0]!r}, pretrained='', checkpoint={str(path)!r}, config='')\n"
        "teacher = load_teacher(tag, 'cpu', precision='fp32')\n"
        "pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))\n"
        "print(json.dumps({'identity': teacher.identity, 'params_identity': teacher_identity(tag),\n"
        "                  'against_file': identity_difference(teacher.identity, teacher_identity(file)),\n"
        "                  'image': teacher.encode_image(pixels)[0, :4].tolist()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=hub_env(tmp_path / "hub", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    digest = sha256_file(path)
    assert f"weights_source=hf-hub:{HUB_REPO}/ weights_sha256={digest}" in report["identity"]
    assert f"weights_sha256={digest}" in report["params_identity"]  # found without building the model
    assert report["against_file"] == ""
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the file's weights, open_clip's QuickGELU model
        expected = torch.nn.functional.normalize(model.eval().encode_image((pixels - mean) / std), dim=-1)
    assert torch.allclose(torch.tensor(report["image"]), expected[0, :4], atol=1e-5)
