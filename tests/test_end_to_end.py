"""All stages end to end through the CLI on tiny configurations.

- the demo pipeline with `dvc repro` (the same commands as `make demo`, tiny sizes): runs
  everything once, then nothing, then only what a changed distill param touches;
- a fake ImageNet folder with WordNet-id class folders, through the ImageNet params file, so
  the ImageNet class metadata and CPA prompt path runs end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.cache import TeacherCache
from pipeline.config import TeacherConfig
from pipeline.features import extract_features
from pipeline.shards import iter_shard, list_shards
from pipeline.student import load_student
from pipeline.teacher import load_teacher
from stages.probe import backbone_and_embedding_encoders
from tests.conftest import ROOT, write_image

RETRIEVAL_KEYS = {f"retrieval_{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5)}
PROBE_KEYS = {
    "teacher": {"linear_top1", "linear_top5", "zeroshot_top1", "zeroshot_top5", "zeroshot_top1_plain",
                "zeroshot_top1_cpa", *RETRIEVAL_KEYS},
    "student": {"linear_top1", "linear_top5", "zeroshot_top1", "zeroshot_top5", "linear_top1_embedding",
                "linear_top5_embedding", *RETRIEVAL_KEYS},
    "random_init": {"linear_top1", "linear_top5"},
    "supervised": {"linear_top1", "linear_top5"},
}


def tiny_demo_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["shards"].update(train=160, val=64, max_per_shard=40, workers=1)
    params["precompute"].update(views=2, batch_size=64, workers=1)
    params["train"].update(image_size=32, epochs=1, batch_size=32, workers=1)
    params["probe"].update(batch_size=64, workers=1)
    return params


def copy_project(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("tests/") or not (ROOT / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          timeout=600, env=env)


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
def test_dvc_repro_runs_everything_then_nothing_then_only_what_changed(tmp_path):
    project = tmp_path / "project"
    copy_project(project)
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_demo_params(), sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=project, check=True)

    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran_stages(first.stdout) == ["shards", "precompute", "distill", "supervised", "probe"]
    assert "student" in first.stdout and "linear top-1" in first.stdout  # the probe table

    params = tiny_demo_params()
    metrics = json.loads((project / "metrics/probe.json").read_text())
    # whole counts: of the 64 val images, and text -> image recall of the val split's distinct captions
    texts = len({s.caption for i, shard in enumerate(list_shards(project / params["probe"]["shards"], "val"))
                 for s in iter_shard(shard, i)})
    hits = {name: {key: value * (texts if key.startswith("retrieval_text_to_image") else 64)
                   for key, value in row.items()} for name, row in metrics.items()}
    assert {name: set(row) for name, row in hits.items()} == PROBE_KEYS
    assert all(abs(count - round(count)) < 1e-9 for row in hits.values() for count in row.values())
    teacher = metrics["teacher"]
    # the cache holds CPA class anchors: the probe's own CPA anchors give the same zero-shot
    assert abs(teacher["zeroshot_top1"] - teacher["zeroshot_top1_cpa"]) <= 1 / 64
    # the shipped demo teacher tells the homonyms apart with CPA prompts only (measured: 64 and 59 of 64)
    assert teacher["zeroshot_top1_cpa"] >= 61 / 64
    assert teacher["zeroshot_top1_plain"] <= teacher["zeroshot_top1_cpa"] - 2 / 64
    # the student's zero-shot, scored here from its checkpoint and the cache's anchors
    assert metrics["student"]["zeroshot_top1"] == student_zero_shot(project, params)

    precompute_metrics = json.loads((project / "metrics/precompute.json").read_text())
    cache = project / params["precompute"]["out"]
    stored = cache.stat().st_size + sum(p.stat().st_size for p in cache.with_name(cache.name + ".parts").glob("*.h5"))
    assert {k: precompute_metrics[k] for k in ("images", "views", "skipped", "file_bytes", "bytes_per_view")} == \
        {"images": 160, "views": 320, "skipped": 0, "file_bytes": stored, "bytes_per_view": round(stored / 320, 1)}
    distill_metrics = json.loads((project / "metrics/distill.json").read_text())
    last_epoch = (project / "plots/distill.csv").read_text().splitlines()[-1].split(",")
    assert distill_metrics["epochs"] == int(last_epoch[0]) == 1
    assert distill_metrics["final_loss"] == pytest.approx(float(last_epoch[1]), abs=1e-6)
    for name in ("probe.png", "distill.png", "distill.csv", "supervised.csv"):
        assert (project / "plots" / name).stat().st_size > 0
    confusions = json.loads((project / "plots" / "confusion.json").read_text())["models"]
    for name in ("teacher", "student"):  # the summary counts the zero-shot errors of the table
        assert confusions[name]["predictions"] == 64
        assert confusions[name]["errors"] == round(64 * (1 - metrics[name]["zeroshot_top1"]))
        assert sum(p["count"] for p in confusions[name]["pairs"]) <= confusions[name]["errors"]

    second = dvc(project, "repro")
    assert second.returncode == 0 and ran_stages(second.stdout) == []

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["tau_teacher"] = params["distill"]["tau_teacher"] * 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(project, "repro")
    assert third.returncode == 0, third.stdout + third.stderr
    assert ran_stages(third.stdout) == ["distill", "probe"]
    student = torch.load(project / params["distill"]["out"], weights_only=True)
    assert student["params"]["tau_teacher"] == params["distill"]["tau_teacher"]
    assert json.loads((project / "metrics/distill.json").read_text())["final_loss"] != distill_metrics["final_loss"]

    shown = dvc(project, "metrics", "show")
    assert shown.returncode == 0 and "metrics/probe.json" in shown.stdout


def student_zero_shot(project: Path, params: dict) -> float:
    """Zero-shot top-1 of the project's student on its val shards against its cache's class anchors,
    with the student's features as the probe extracts them (same precision and batch)."""
    probe = params["probe"]
    model, _ = load_student(project / probe["student"])
    _, embed = backbone_and_embedding_encoders(model, torch.device("cpu"), probe["precision"])
    features, labels, _ = extract_features(list_shards(project / probe["shards"], "val"),
                                           {"student": (params["train"]["image_size"], embed)}, probe["batch_size"], 0)
    cache = TeacherCache(project / probe["cache"])
    scores = features["student"] @ cache.anchors().T  # unit-norm embeddings: cosines; one anchor per class
    assert cache.anchor_classes().tolist() == list(range(cache.header.num_classes))
    return (scores.argmax(-1) == labels).sum().item() / len(labels)


def fake_imagenet(root: Path, wnids: list[str], per_class: int) -> None:
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            write_image(root / wnid / f"{wnid}_{i}.JPEG", seed=1000 * c + i, size=(48, 40))


@pytest.mark.slow
def test_fake_imagenet_folder_through_the_imagenet_params(tmp_path, tiny_teacher):
    wnids = ["n01440764", "n02012849", "n03126707", "n03710637"]
    fake_imagenet(tmp_path / "train", wnids, 12)
    fake_imagenet(tmp_path / "val", wnids, 3)
    config, weights = tiny_teacher
    params = ["--params", str(ROOT / "params/imagenet-vit-b-32.yaml")]
    teacher = ["--teacher-model", "", "--teacher-pretrained", "", "--teacher-config", str(config),
               "--teacher-checkpoint", str(weights)]
    shards, cache, models = tmp_path / "shards", tmp_path / "cache.h5", tmp_path / "models"
    steps = [
        ["shards", "--root", str(tmp_path / "train"), "--val-root", str(tmp_path / "val"), "--out", str(shards),
         "--max-per-shard", "16", "--workers", "1"],
        ["precompute", "--shards", str(shards), "--out", str(cache), "--metrics", str(tmp_path / "pre.json"),
         "--views", "2", "--batch-size", "32", "--workers", "1", *teacher],
        ["distill", "--shards", str(shards), "--cache", str(cache), "--out", str(models / "student.pt"),
         "--run-dir", str(models / "run"), "--metrics", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.csv"),
         "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--workers", "1", *teacher],
        ["probe", "--shards", str(shards), "--cache", str(cache), "--student", str(models / "student.pt"),
         "--supervised", "", "--out", str(tmp_path / "probe.json"), "--plots", str(tmp_path / "plots"),
         "--distill-csv", str(tmp_path / "d.csv"), "--batch-size", "32", "--workers", "1", *teacher],
    ]
    for step in steps:
        result = subprocess.run([sys.executable, "-m", "pipeline", *params, *step], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{step[0]}: {result.stderr[-2000:]}"

    classes = json.loads((shards / "classes.json").read_text())
    assert [c["id"] for c in classes] == wnids
    assert classes[1]["name"] == "crane bird" and classes[1]["contexts"] == ["wading bird"]
    with h5py.File(cache) as f:
        prompts = [p.decode() for p in f["prompts/text"][:]]
        prompt_classes = torch.from_numpy(f["prompts/class"][:]).long()
        prompt_embeddings = torch.from_numpy(f["prompts/embeddings"][:])
        anchors = torch.from_numpy(f["anchors/embeddings"][:])
    assert len(prompts) == 4 * 80 and prompt_classes.tolist() == [c for c in range(4) for _ in range(80)]
    # the teacher's embeddings of the stored prompts (the stage encoded them in bf16 on this CPU)
    teacher = load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config)),
                           "cpu", precision="fp32")
    recomputed = teacher.encode_text(prompts[::40])
    assert torch.allclose(prompt_embeddings[::40], recomputed, atol=1e-2)
    # each class anchor: the normalised mean of its 80 unit-norm prompt embeddings
    expected = torch.stack([F.normalize(prompt_embeddings[prompt_classes == c], dim=-1).mean(0) for c in range(4)])
    assert torch.allclose(anchors, F.normalize(expected, dim=-1), atol=1e-6)
    assert "a bad photo of a crane bird, a type of wading bird." in prompts
    assert "a bad photo of a construction crane, a type of lifting device." in prompts
    metrics = json.loads((tmp_path / "probe.json").read_text())
    assert set(metrics) == {"teacher", "student", "random_init"}
