"""dvc.yaml cannot drift from the code: every project module a stage imports is one of its deps.

A stage's command `python -m pipeline NAME` runs `stages/NAME.py`; the modules it needs are the
transitive closure of its imports of `pipeline.*` and `stages.*` (module-level and inside
functions), found with `ast`. The CLI entry point (`pipeline/__main__.py`, which only dispatches)
and the package markers are not deps. Shipped data files a module reads are deps too.
The stages are read as DVC resolves them (`${...}` filled in from params.yaml), and dvc.yaml
itself must take every path that params.yaml holds from there, never spell it again.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import PARAMS, ROOT

NOT_DEPS = {"pipeline/__main__.py", "pipeline/__init__.py", "stages/__init__.py"}
# Shipped data a module reads whenever it is imported and used.
DATA_READ_BY = {"pipeline/resources.py": ["data/imagenet/classes.json"]}


def imported_modules(path: Path) -> set[str]:
    """Project files imported by one file (any import statement at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            candidate = Path(*name.split(".")).with_suffix(".py")
            if name.split(".")[0] in ("pipeline", "stages") and (ROOT / candidate).is_file():
                found.add(candidate.as_posix())
    return found


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(imported_modules(ROOT / current) - seen)
    return seen - NOT_DEPS


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def resolved_stages() -> dict[str, Any]:
    """dvc.yaml's stages as DVC reads them, with `${...}` resolved from params.yaml."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.name: stage for stage in repo.index.stages}


def test_every_stage_lists_the_modules_and_data_it_uses():
    stages = resolved_stages()
    assert {"shards", "demo_teacher", "precompute", "distill", "supervised", "probe"} <= set(stages)
    missing = {}
    for name, stage in stages.items():
        command = stage.cmd.split()
        assert command[:3] == ["python", "-m", "pipeline"], name
        module = f"stages/{command[3].replace('-', '_')}.py"
        needed = closure(module)
        for code in sorted(needed):
            needed |= set(DATA_READ_BY.get(code, []))
        deps = [dep.def_path for dep in stage.deps]
        lacking = sorted(path for path in needed if not covered(path, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml deps lack: {missing}"


def written_paths(dvc_yaml: dict) -> list[str]:
    """Every path dvc.yaml names as written (before DVC resolves `${...}`): deps, outs, metrics, plots."""
    entries = list(dvc_yaml.get("plots", []))
    for stage in dvc_yaml["stages"].values():
        for kind in ("deps", "outs", "metrics", "plots"):
            entries += stage.get(kind, [])
    return [path for entry in entries for path in (entry if isinstance(entry, dict) else [entry])]


def literal_params_paths(dvc_yaml: dict, params: dict) -> list[str]:
    """Paths of dvc.yaml that spell out a value of params.yaml (or a file under or beside it)."""
    values = {value for section in params.values() if isinstance(section, dict)
              for value in section.values() if isinstance(value, str) and value}
    return sorted(path for path in written_paths(dvc_yaml) for value in values
                  if path == value or path.startswith((value + "/", value + ".")))


def test_dvc_yaml_takes_every_path_params_yaml_holds_from_params_yaml():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load(PARAMS.read_text())
    literal = literal_params_paths(dvc_yaml, params)
    assert not literal, f"dvc.yaml spells out params.yaml's paths (write ${{section.key}}): {literal}"
    # the check itself: a spelled-out path, one under a params directory, one beside a params file
    spelled = {"stages": {"s": {"deps": [params["shards"]["out"], "data/prompts"],
                                "outs": [{params["probe"]["plots"] + "/probe.png": {"cache": False}},
                                         params["precompute"]["out"] + ".parts"]}}}
    assert literal_params_paths(spelled, params) == sorted([
        params["shards"]["out"], params["probe"]["plots"] + "/probe.png", params["precompute"]["out"] + ".parts"])


def test_the_demo_teacher_stage_is_frozen_and_feeds_the_teacher_to_its_users():
    stages = resolved_stages()
    teacher = stages["demo_teacher"]
    checkpoint = yaml.safe_load(PARAMS.read_text())["teacher"]["checkpoint"]
    assert teacher.frozen and [(out.def_path, out.use_cache) for out in teacher.outs] == [(checkpoint, False)]
    for user in ("precompute", "probe"):
        assert checkpoint in [dep.def_path for dep in stages[user].deps], user


def test_the_closure_follows_imports_inside_functions():
    assert "pipeline/linear_probe.py" in closure("stages/probe.py")
    assert "pipeline/progress.py" in closure("stages/precompute.py")  # via pipeline.features etc.
    assert "pipeline/__main__.py" not in closure("stages/probe.py")
