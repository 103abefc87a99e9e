"""scripts/gpu_smoke.py in its CPU form: every stage, the resume checks and every ratio, so the GPU form cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_smoke.py"
STEPS = {"device", "shards", "teacher", "precompute", "distill", "decode_device", "probe", "predict", "export",
         "bench", "ratios", "precompute_killed", "precompute_resumed", "verify", "distill_deterministic",
         "distill_killed", "distill_resumed", "distill_2rank"}
SKIPPED_ON_CPU = {"distill_deterministic", "distill_2rank"}  # --deterministic is for GPUs; NCCL needs 2 GPUs
RATIOS = {"precompute_over_teacher", "distill_over_student_compute", "item_every_step_over_end_only",
          "pinned_over_pageable", "tf32_over_fp32"}
NOT_ON_CPU = {"pinned_over_pageable": "n/a on cpu", "tf32_over_fp32": "n/a on cpu (tf32 runs as fp32 there)"}


def smoke(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_form_runs_every_stage_and_reports_every_ratio(tmp_path):
    out = tmp_path / "smoke.json"
    result = smoke(["--cpu", "--json", str(out), "--work", str(tmp_path / "work")], timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] and summary["failed"] == "" and summary["form"] == "cpu"
    assert summary["device"].startswith("cpu (") and summary["torch"] == torch.__version__
    assert set(summary["steps"]) == STEPS
    for name, step in summary["steps"].items():
        if name in SKIPPED_ON_CPU:
            assert step["seconds"] == 0 and step["result"].startswith("skipped: "), (name, step)
        else:
            assert step["seconds"] > 0 and step["result"].startswith("ok"), (name, step)
    # the resume checks compared what they say they compared
    assert summary["steps"]["precompute_resumed"]["result"] == \
        "ok: equal to the uninterrupted cache in every dataset and attribute"
    assert summary["steps"]["distill_resumed"]["result"] == "ok: the weights of the run not killed, bit for bit"
    assert set(summary["ratios"]) == RATIOS
    for name, value in summary["ratios"].items():
        if name in NOT_ON_CPU:
            assert value == NOT_ON_CPU[name]
        else:
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    # each ratio's figures come from this run
    figures = summary["figures"]
    assert figures["distill_images_per_second"] > 0 and figures["student_compute_images_per_second"] > 0
    assert summary["ratios"]["distill_over_student_compute"] == pytest.approx(
        figures["distill_images_per_second"] / figures["student_compute_images_per_second"], rel=1e-2)
    # progress lines as it goes, and the table at the end
    assert "] distill: resnet18 at 32 px" in result.stdout
    assert "cpu smoke on cpu (" in result.stdout and ": passed in " in result.stdout
    for name in RATIOS:
        assert f"  {name} " in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_check_stops_the_run_with_one_line_and_exit_code_1(tmp_path):
    out = tmp_path / "smoke.json"
    result = smoke(["--json", str(out), "--work", str(tmp_path / "work")], timeout=120)  # the GPU form, no GPU
    assert result.returncode == 1
    assert "FAIL device: --device cuda: CUDA is not available" in result.stdout and "--cpu" in result.stdout
    summary = json.loads(out.read_text())
    assert not summary["passed"] and summary["failed"] == "device"
    assert summary["steps"] == {"device": {"seconds": summary["steps"]["device"]["seconds"], "result": "FAILED"}}
