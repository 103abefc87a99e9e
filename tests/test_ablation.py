"""scripts/ablation.py: rows share caches by their precompute settings and differ where they should."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from stages import shards
from tests.conftest import ROOT, stage_config


def write_tiny_params(tmp_path, demo_shards, tiny_teacher, views: int) -> None:
    """params.yaml in tmp_path: the tiny teacher, the test shards, one short epoch."""
    config, weights = tiny_teacher
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["teacher"].update(config=str(config), checkpoint=str(weights))
    params["prompts"].update(plain_templates=str(ROOT / params["prompts"]["plain_templates"]),
                             cpa_templates=str(ROOT / params["prompts"]["cpa_templates"]))
    params["demo_teacher"].update(shards=str(demo_shards), config=str(config), arch="two-tower", steps=2, batch_size=8,
                                  warmup_steps=1, eval_every=0, workers=0, init="")
    params["precompute"].update(shards=str(demo_shards), views=views, batch_size=64, workers=0)
    params["train"].update(shards=str(demo_shards), image_size=32, epochs=1, batch_size=16, workers=0)
    params["probe"].update(shards=str(demo_shards), batch_size=64, workers=0, max_train_images=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def run_ablation(tmp_path, rows: dict, json_name: str, timeout: int = 600,
                 *extra: str) -> subprocess.CompletedProcess:
    """scripts/ablation.py over `rows` with tmp_path's params.yaml, in tmp_path."""
    (tmp_path / "rows.yaml").write_text(yaml.safe_dump(rows))
    return subprocess.run([sys.executable, str(ROOT / "scripts/ablation.py"), "--params", "params.yaml",
                           "--rows-file", "rows.yaml", "--json", json_name, *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_two_rows_run_and_share_nothing_they_should_not(demo_shards, tiny_teacher, tmp_path):
    write_tiny_params(tmp_path, demo_shards, tiny_teacher, views=2)
    rows = {"baseline": {}, "top-1 targets": {"precompute.topk": 1}}
    result = run_ablation(tmp_path, rows, "ablation.json")
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    results = {r["label"]: {**r["params"], **r["figures"]}
               for r in json.loads((tmp_path / "ablation.json").read_text())["records"]}
    assert results["baseline"]["precompute.topk"] == 0 and results["top-1 targets"]["precompute.topk"] == 1
    assert results["top-1 targets"]["bytes_per_view"] < results["baseline"]["bytes_per_view"]
    assert results["baseline"]["precompute.views"] == 2
    assert len(list((tmp_path / "data/ablation/caches").glob("*.h5"))) == 2  # one cache per setting
    # the same teacher and anchors in both rows: only the student's targets differ
    assert results["baseline"]["teacher_zeroshot_top1"] == results["top-1 targets"]["teacher_zeroshot_top1"]
    # a second run reuses the finished rows
    again = run_ablation(tmp_path, rows, "ablation.json", timeout=120)
    assert again.returncode == 0 and "distill" not in again.stderr
    # its records replace those with the same settings; the study's page shows them
    assert len(json.loads((tmp_path / "ablation.json").read_text())["records"]) == 2
    assert "| top-1 targets | 2 | 1 |" in (tmp_path / "ablation.md").read_text()
    # a changed default in params.yaml (here the student's batch) runs the rows again, on the same caches
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"]["batch_size"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    changed = run_ablation(tmp_path, {"baseline": {}}, "ablation.json", timeout=300)
    assert changed.returncode == 0 and "distill epoch 1" in changed.stderr and "precompute" not in changed.stderr


@pytest.mark.slow
def test_teacher_rows_pre_train_their_own_teacher_and_report_it(demo_shards, tiny_teacher, tmp_path):
    write_tiny_params(tmp_path, demo_shards, tiny_teacher, views=1)
    rows = {"clip": {"demo_teacher.objective": "clip"},
            "psd": {"demo_teacher.objective": "psd", "demo_teacher.psd_rho": 1.0}}
    result = run_ablation(tmp_path, rows, "teachers.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| row | teacher steps | teacher minutes |" in result.stdout
    results = {r["label"]: r["figures"] for r in json.loads((tmp_path / "teachers.json").read_text())["records"]}
    assert results["clip"]["teacher_steps"] == 2
    for row in ("clip", "psd"):  # each row's teacher figures are its own probe's, as percentages
        measured = json.loads((tmp_path / "data/ablation" / row / "probe.json").read_text())["teacher"]
        assert results[row]["teacher_linear_top1"] == round(100 * measured["linear_top1"], 4)
        assert results[row]["teacher_zeroshot_top1"] == round(100 * measured["zeroshot_top1"], 4)
    teachers = sorted((tmp_path / "data/ablation/teachers").glob("*.safetensors"))
    assert len(teachers) == 2  # one teacher per row, each the teacher of its own cache
    assert len(list((tmp_path / "data/ablation/caches").glob("*.h5"))) == 2
    identities = {json.loads(t.with_suffix(".metrics.json").read_text())["identity"] for t in teachers}
    assert len(identities) == 2
    # a row whose model config file is edited in place pre-trains another teacher (not the stale one)
    config_file, _ = tiny_teacher
    copy = tmp_path / "config-copy.json"
    copy.write_text(config_file.read_text())
    rows = {"clip": {"demo_teacher.objective": "clip", "demo_teacher.config": str(copy)}}
    assert run_ablation(tmp_path, rows, "teachers.json").returncode == 0
    copy.write_text(json.dumps({**json.loads(config_file.read_text()), "embed_dim": 16}))
    again = run_ablation(tmp_path, rows, "teachers.json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list((tmp_path / "data/ablation/teachers").glob("*.safetensors"))) == 4


def test_teacher_only_rows_measure_the_teacher_alone(tiny_teacher, tmp_path):
    """--teacher-only (the PSD study, params/psd.yaml): a row pre-trains its teacher and measures it
    with stages.probe.measure_teacher on the hard world's shards, with no cache and no student."""
    shard_dir = tmp_path / "hard"
    shards.run(stage_config("shards", source="demo", world="hard", out=str(shard_dir), train=64, val=32, shifted=32,
                            max_per_shard=32, workers=1))
    write_tiny_params(tmp_path, shard_dir, tiny_teacher, views=1)
    rows = {"psd": {"demo_teacher.objective": "psd", "demo_teacher.eval_every": 1}}
    study_rows = yaml.safe_load((ROOT / "params/psd.yaml").read_text())
    assert set(study_rows) == {
        f"{objective}, noise {noise}{images}, seed {seed}" for objective in ("CLIP", "PSD")
        for noise, images in ((0.3, ""), (0.6, ""), (0.3, ", 5,120 images")) for seed in (1000, 1001)}
    assert {row.get("demo_teacher.train_images", 0) for row in study_rows.values()} == {0, 5120}
    result = run_ablation(tmp_path, rows, "psd.json", 300, "--teacher-only")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| row | steps | minutes | zero-shot top-1 | linear top-1 | shifted zero-shot |" in result.stdout
    assert not (tmp_path / "data/ablation/caches").exists() and not (tmp_path / "data/ablation/psd").exists()
    [record] = json.loads((tmp_path / "psd.json").read_text())["records"]
    [weights] = (tmp_path / "data/ablation/teachers").glob("*.safetensors")
    measured = json.loads(weights.with_suffix(".measures.json").read_text())
    trained = json.loads(weights.with_suffix(".metrics.json").read_text())
    figures = record["figures"]
    assert figures["teacher_steps"] == 2 and record["params"]["demo_teacher.objective"] == "psd"
    for figure, key in (("teacher_zeroshot_top1", "zeroshot_top1"), ("teacher_linear_top1", "linear_top1"),
                        ("teacher_shifted_linear_top1", "shifted_linear_top1"),
                        ("teacher_image_to_text_r1", "retrieval_image_to_text_r1")):
        assert figures[figure] == round(100 * measured[key], 4)
    # the zero-shot the teacher's own training measured (CPA, val) is what the row measured
    assert measured["zeroshot_top1"] == trained["zero_shot_top1_cpa"]
    assert measured["zeroshot_top1_plain"] == trained["zero_shot_top1_plain"]
    # convergence: the final CPA zero-shot minus the last evaluation's during training (step 1 of 2)
    assert figures["teacher_last_interval_gain"] == round(100 * (trained["zero_shot_top1_cpa"]
                                                                 - trained["history"][-2]["cpa"]), 2)
    assert figures["teacher_peak_zeroshot_top1"] == round(100 * max(trained["zero_shot_top1_cpa"],
                                                                     trained["history"][-2]["cpa"]), 4)


def test_seed_rows_train_and_probe_the_supervised_reference_at_the_same_seed(demo_shards, tiny_teacher, tmp_path):
    """--supervised (the seed study, params/seeds.yaml): every row trains the supervised reference
    with the row's train settings; its record holds the reference's probe figure and the seed."""
    write_tiny_params(tmp_path, demo_shards, tiny_teacher, views=1)
    assert set(yaml.safe_load((ROOT / "params/seeds.yaml").read_text())["seed 1"]) == {"train.seed"}
    rows = {"seed 1": {"train.seed": 1}}
    result = run_ablation(tmp_path, rows, "seeds.json", 600, "--supervised")
    assert result.returncode == 0, result.stderr[-2000:]
    [record] = json.loads((tmp_path / "seeds.json").read_text())["records"]
    measured = json.loads((tmp_path / "data/ablation/seed-1/probe.json").read_text())
    assert record["params"]["train.seed"] == 1
    assert record["figures"]["supervised_linear_top1"] == round(100 * measured["supervised"]["linear_top1"], 4)
    assert record["figures"]["student_linear_top1"] == round(100 * measured["student"]["linear_top1"], 4)
    assert record["figures"]["random_linear_top1"] == round(100 * measured["random_init"]["linear_top1"], 4)
    assert "teacher_errors_related" not in record["figures"]  # the easy world: no related classes
    reference = torch.load(tmp_path / "data/ablation/seed-1/supervised.pt", weights_only=True)
    assert reference["params"]["train"]["seed"] == 1  # trained at the row's seed, not params.yaml's 0
