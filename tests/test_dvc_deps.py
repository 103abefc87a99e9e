"""dvc.yaml cannot drift from the code: every project module a stage imports is one of its deps.

A stage's command `python -m pipeline NAME` runs `stages/NAME.py`; the modules it needs are the
transitive closure of its imports of `pipeline.*` and `stages.*` (module-level and inside
functions), found with `ast`. The CLI entry point (`pipeline/__main__.py`, which only dispatches)
and the package markers are not deps. Shipped data files a module reads are deps too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

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


def test_every_stage_lists_the_modules_and_data_it_uses():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        command = stage["cmd"].split()
        assert command[:3] == ["python", "-m", "pipeline"], name
        module = f"stages/{command[3].replace('-', '_')}.py"
        needed = closure(module)
        for code in sorted(needed):
            needed |= set(DATA_READ_BY.get(code, []))
        lacking = sorted(path for path in needed if not covered(path, stage["deps"]))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml deps lack: {missing}"


def test_the_closure_follows_imports_inside_functions():
    assert "pipeline/linear_probe.py" in closure("stages/probe.py")
    assert "pipeline/progress.py" in closure("stages/precompute.py")  # via pipeline.features etc.
    assert "pipeline/__main__.py" not in closure("stages/probe.py")
