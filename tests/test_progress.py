"""Progress: plain periodic lines when output is not a terminal, a bar with a total when it is."""

from __future__ import annotations

import logging
import subprocess
import sys

from pipeline.progress import Progress, format_seconds
from tests.conftest import ROOT


def test_plain_lines_report_count_rate_eta_and_postfix(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    progress = Progress(100, "precompute", "img", terminal=False, every_seconds=0.0)
    progress.update(40)
    progress.set_postfix(loss="0.412")
    progress.update(10)
    progress.close()
    progress.close()  # closing twice reports once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("precompute: 40/100 img (40%), ") and "ETA" in lines[0]
    assert lines[1].startswith("precompute: 50/100 img (50%), ") and lines[1].endswith("loss=0.412")
    assert lines[2].startswith("precompute: 50/100 img (50%), ")  # the final line on close


def test_plain_lines_are_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    progress = Progress(1000, "distill 1/4", "step", terminal=False, every_seconds=3600)
    for _ in range(1000):
        progress.update()
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("distill 1/4: 1000/1000 step (100%)") and "took" in lines[0]


def test_format_seconds():
    assert [format_seconds(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_a_stage_run_into_a_file_has_no_carriage_returns(tmp_path):
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "-m", "pipeline", "shards", "--source", "demo", "--out", str(out),
                             "--train", "40", "--val", "8", "--workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "wrote" in result.stderr
