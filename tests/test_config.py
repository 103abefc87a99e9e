"""Configs: params.yaml is complete, unknown keys are errors, overrides are type-checked."""

from __future__ import annotations

import copy
import typing

import pytest
import yaml

from pipeline.config import (
    NESTED_SECTIONS,
    STAGE_CONFIGS,
    config_fields,
    is_config,
    load_config,
    override,
    read_params,
)
from pipeline.errors import PipelineError
from tests.conftest import PARAMS


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_params_yaml_has_every_stage(stage):
    config = load_config(stage, PARAMS)
    assert type(config) is STAGE_CONFIGS[stage]


def test_nested_sections_come_from_their_own_section():
    distill = load_config("distill", PARAMS)
    params = read_params(PARAMS)
    assert distill.train.epochs == params["train"]["epochs"]
    assert distill.teacher.config == params["teacher"]["config"]


def test_override_checks_types_and_choices():
    distill = load_config("distill", PARAMS)
    changed = override(distill, {"train.epochs": 7, "tau_teacher": 1})
    assert changed.train.epochs == 7 and changed.tau_teacher == 1.0
    assert distill.train.epochs == read_params(PARAMS)["train"]["epochs"]  # the original is untouched
    assert changed.train.lr == distill.train.lr and changed.teacher == distill.teacher
    with pytest.raises(PipelineError, match="integer"):
        override(distill, {"train.epochs": "seven"})
    with pytest.raises(PipelineError, match="one of"):
        override(distill, {"train.optimizer": "adam"})
    with pytest.raises(PipelineError, match="unknown option"):
        override(distill, {"epochz": 1})


def test_unknown_and_missing_keys_are_errors(tmp_path):
    text = PARAMS.read_text()
    (tmp_path / "extra.yaml").write_text(text.replace("  store_embeddings: false", "  store_embedings: false"))
    with pytest.raises(PipelineError, match="unknown key.*store_embedings"):
        load_config("precompute", tmp_path / "extra.yaml")
    (tmp_path / "missing.yaml").write_text(text.replace("  store_embeddings: false\n", ""))
    with pytest.raises(PipelineError, match="precompute.store_embeddings is missing"):
        load_config("precompute", tmp_path / "missing.yaml")


# The command that reads each params section (a nested section through a stage that uses it).
COMMAND_OF = {"shards": "shards", "demo_teacher": "demo-teacher", "precompute": "precompute", "distill": "distill",
              "supervised": "supervised", "probe": "probe", "bench": "bench", "train": "distill",
              "teacher": "precompute", "prompts": "precompute"}
WRONG_TYPE = {str: [1, 2], int: "many", float: "much", bool: "yes"}


def bad_values(f, tp) -> list[tuple[str, object]]:
    """(what, value) pairs every field must refuse: a wrong type, a negative or out-of-range number,
    a value outside its choices."""
    low, high, _, _ = f.metadata["range"]
    if typing.get_origin(tp) is tuple:
        cases = [("wrong type", "x"), ("negative", [-1.0, -1.0])]
        if high is not None:
            cases.append(("out of range", [min(0.5, high), high + 1]))
        return cases
    cases = [("wrong type", WRONG_TYPE[tp])]
    if tp in (int, float):
        cases.append(("negative", -1))
        if low > 0:
            cases.append(("below the range", type(low)(0) if tp is float else 0))
        if high is not None:
            cases.append(("out of range", tp(high + 1)))
    if f.metadata.get("choices"):
        cases.append(("not a choice", "bogus"))
    return cases


def test_every_field_of_every_section_refuses_bad_values_in_one_line(tmp_path, monkeypatch, capsys):
    """Generated from the config classes: each bad value of each field, and an unknown key in each
    section, makes its command exit with code 2 and one line naming the field (section.field)."""
    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)  # a value that got through would run a stage here, not in the project
    base = yaml.safe_load(PARAMS.read_text())
    sections = {**STAGE_CONFIGS, **NESTED_SECTIONS}
    failures, tried = [], 0

    def expect_refusal(params: dict, command: str, names: str, what: str) -> None:
        nonlocal tried
        tried += 1
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        code = main(["--params", str(path), command])
        err = capsys.readouterr().err.strip().splitlines()
        if code != 2 or len(err) != 1 or names not in err[0]:
            failures.append(f"{names} {what}: exit {code}, {err[-3:]}")

    for section, cls in sections.items():
        for f, tp in config_fields(cls):
            if is_config(tp):
                continue
            for what, value in bad_values(f, tp):
                params = copy.deepcopy(base)
                params[section][f.name] = value
                expect_refusal(params, COMMAND_OF[section], f"{section}.{f.name}", what)
        params = copy.deepcopy(base)
        params[section]["bogus_key"] = 1
        expect_refusal(params, COMMAND_OF[section], f"unknown key(s) bogus_key in section '{section}'", "unknown key")
    assert not failures, f"{len(failures)} of {tried} bad values were not refused in one line:\n" + "\n".join(failures)
    assert tried >= 190  # every field of every section: 194 bad values and unknown keys today
