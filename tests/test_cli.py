"""The command line: every command has --help with defaults; bad input is one line, exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMANDS = ["shards", "demo-teacher", "precompute", "distill", "supervised", "probe", "bench",
            "inspect", "verify", "report"]


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}  # help text unwrapped, so assertions see whole lines
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


def test_help_lists_every_command():
    result = cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def words(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


def test_help_shows_defaults_from_params():
    result = cli("shards", "--help")
    assert "(default: data/shards/demo)" in words(result.stdout)
    assert "(default: 10000)" in words(result.stdout)
    result = cli("distill", "--help")
    assert "--epochs" in result.stdout and "--tau-teacher" in result.stdout
    assert "--teacher-config" in result.stdout


@pytest.mark.parametrize("command", ["shards", "precompute", "distill", "probe", "predict", "export"])
def test_help_at_80_columns_shows_every_option_name_whole(command):
    """Every option of the command appears in full in --help on an 80-column terminal."""
    import typer

    from pipeline.__main__ import app

    options = [name for param in typer.main.get_command(app).commands[command].params
               if isinstance(param, typer.core.TyperOption) for name in param.opts + param.secondary_opts
               if name.startswith("--")]
    result = subprocess.run([sys.executable, "-m", "pipeline", command, "--help"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "80", "TERM": "xterm"})
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    shown = set(re.findall(r"--[a-z0-9-]+", result.stdout))
    assert len(options) >= 3 and [o for o in options if o not in shown] == []
    if command != "shards":
        assert "--teacher-checkpoint" in shown  # the option the offline route needs


def test_params_file_sets_the_defaults(tmp_path):
    params = (ROOT / "params.yaml").read_text().replace("train: 10000", "train: 123")
    (tmp_path / "params.yaml").write_text(params)
    result = cli("--params", str(tmp_path / "params.yaml"), "shards", "--help")
    assert "(default: 123)" in result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_option_is_one_line_exit_2():
    assert "--bogus" in one_line_error(cli("shards", "--bogus", "1"))


def test_bad_value_is_one_line_exit_2():
    assert "--train" in one_line_error(cli("shards", "--train", "many"))
    assert "--source" in one_line_error(cli("shards", "--source", "nowhere"))


def test_missing_path_is_one_line_exit_2(tmp_path):
    line = one_line_error(cli("shards", "--source", "folder", "--root", str(tmp_path / "missing"),
                              "--out", str(tmp_path / "out")))
    assert str(tmp_path / "missing") in line and "--root" in line


def test_unknown_params_key_is_one_line_exit_2(tmp_path):
    params = (ROOT / "params.yaml").read_text().replace("  max_per_shard:", "  max_per_shrad:", 1)
    (tmp_path / "params.yaml").write_text(params)
    line = one_line_error(cli("--params", str(tmp_path / "params.yaml"), "shards"))
    assert "max_per_shrad" in line


def test_missing_params_file_is_one_line_exit_2(tmp_path):
    line = one_line_error(cli("shards", cwd=tmp_path))
    assert "params.yaml" in line


def test_demo_shards_from_the_cli(tmp_path):
    out = tmp_path / "demo"
    result = cli("shards", "--out", str(out), "--train", "20", "--val", "10", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert (out / "train-000000.tar").is_file() and (out / "manifest.json").is_file()


def test_main_called_from_python_runs_with_the_params_it_is_given(tmp_path, monkeypatch):
    from pipeline.__main__ import main

    out = tmp_path / "from-params"
    params = (ROOT / "params.yaml").read_text().replace("train: 10000", "train: 6").replace(
        "val: 2000", "val: 3").replace("out: data/shards/demo", f"out: {out}")
    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.chdir(tmp_path)  # sys.argv here is pytest's: nothing may be read from it
    assert main(["--params", str(tmp_path / "params.yaml"), "shards", "--workers", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 6 and manifest["splits"]["val"]["samples"] == 3
