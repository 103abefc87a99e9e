"""scripts/ablation.py: rows share caches by their precompute settings and differ where they should."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import ROOT


def test_two_rows_run_and_share_nothing_they_should_not(demo_shards, tiny_teacher, tmp_path):
    config, weights = tiny_teacher
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["teacher"].update(config=str(config), checkpoint=str(weights))
    params["prompts"].update(plain_templates=str(ROOT / params["prompts"]["plain_templates"]),
                             cpa_templates=str(ROOT / params["prompts"]["cpa_templates"]))
    params["precompute"].update(shards=str(demo_shards), views=2, batch_size=64, workers=0)
    params["train"].update(shards=str(demo_shards), image_size=32, epochs=1, batch_size=16, workers=0)
    params["probe"].update(shards=str(demo_shards), batch_size=64, workers=0, max_train_images=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rows = {"baseline": {}, "top-1 targets": {"precompute.topk": 1}}
    (tmp_path / "rows.yaml").write_text(yaml.safe_dump(rows))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts/ablation.py"), "--params", "params.yaml",
                             "--rows-file", "rows.yaml", "--json", "ablation.json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    results = {r["row"]: r for r in json.loads((tmp_path / "ablation.json").read_text())["rows"]}
    assert results["baseline"]["topk"] == 0 and results["top-1 targets"]["topk"] == 1
    assert results["top-1 targets"]["bytes_per_view"] < results["baseline"]["bytes_per_view"]
    assert results["baseline"]["views_per_image"] == 2
    assert len(list((tmp_path / "data/ablation/caches").glob("*.h5"))) == 2  # one cache per setting
    # the same teacher and anchors in both rows: only the student's targets differ
    assert results["baseline"]["teacher_zeroshot_top1"] == results["top-1 targets"]["teacher_zeroshot_top1"]
    # a second run reuses the finished rows
    again = subprocess.run([sys.executable, str(ROOT / "scripts/ablation.py"), "--params", "params.yaml",
                            "--rows-file", "rows.yaml", "--json", "ablation.json"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "distill" not in again.stderr
