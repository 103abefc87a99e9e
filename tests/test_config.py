"""Configs: params.yaml is complete, unknown keys are errors, overrides are type-checked."""

from __future__ import annotations

import copy
import subprocess
import sys
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
from tests.conftest import PARAMS, ROOT


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
              "supervised": "supervised", "ssl": "ssl", "probe": "probe", "bench": "bench", "train": "distill",
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


def write_overlay(directory, text: str, name: str = "overlay.yaml"):
    """An overlay in `directory`/params/ over a copy of params.yaml in `directory`."""
    (directory / "params.yaml").write_text(PARAMS.read_text())
    (directory / "params").mkdir(exist_ok=True)
    path = directory / "params" / name
    path.write_text(text)
    return path


def test_an_overlay_is_its_base_with_the_keys_it_sets_changed(tmp_path):
    overlay = write_overlay(tmp_path, "extends: ../params.yaml\n"
                                      "precompute: {views: 5, crop_scale: [0.2, 0.9]}\n"
                                      "train: {epochs: 3}\n")
    base = load_config("precompute", PARAMS)
    precompute = load_config("precompute", overlay)
    assert precompute.views == 5 != base.views  # from the overlay
    assert precompute.crop_scale == (0.2, 0.9)  # a list is replaced whole
    assert precompute.batch_size == base.batch_size and precompute.teacher == base.teacher  # from the base
    distill = load_config("distill", overlay)
    assert distill.train.epochs == 3  # a nested section, merged key by key
    assert distill.train.lr == read_params(PARAMS)["train"]["lr"]
    assert distill.tau_teacher == load_config("distill", PARAMS).tau_teacher
    assert "extends" not in read_params(overlay)


@pytest.mark.parametrize(("text", "message"), [
    ("extends: ../params.yaml\ntrain: {epochz: 3}\n",
     r"overlay.yaml: unknown key\(s\) epochz in section 'train', not in its base .*params.yaml; "
     r"known keys: arch, batch_size, cache, "),
    ("extends: ../params.yaml\ntrian: {epochs: 3}\n",
     r"overlay.yaml: unknown section\(s\) trian, not in its base .*; known sections: bench, demo_teacher, "),
    ("extends: ../params.yaml\ntrain: 3\n", r"overlay.yaml: 'train' must be a mapping"),
    ("extends: ../gone.yaml\n", r"overlay.yaml: extends: .*gone.yaml not found"),
    ("extends: chained.yaml\n", r"overlay.yaml: its base .*chained.yaml is an overlay too"),
    ("extends: [../params.yaml]\n", r"overlay.yaml: extends: expected the path of a params file"),
])
def test_overlay_mistakes_are_one_line_errors_naming_the_overlay(tmp_path, text, message):
    overlay = write_overlay(tmp_path, text)
    write_overlay(tmp_path, "extends: ../params.yaml\n", "chained.yaml")
    with pytest.raises(PipelineError, match=message) as raised:
        load_config("distill", overlay)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name", ["imagenet-vit-b-32.yaml", "imagenet-vit-l-14.yaml"])
def test_the_imagenet_params_are_overlays_of_params_yaml_that_hold_only_what_differs(name):
    path = ROOT / "params" / name
    raw = yaml.safe_load(path.read_text())
    assert raw["extends"] == "../params.yaml"
    base = read_params(PARAMS)
    same = [f"{section}.{key}" for section, values in raw.items() if section != "extends"
            for key, value in values.items() if base[section][key] == value]
    assert not same, f"{name} repeats params.yaml's values of {same}"
    for stage, cls in STAGE_CONFIGS.items():
        assert type(load_config(stage, path)) is cls
    assert load_config("precompute", path).teacher.pretrained == "openai"
    assert load_config("distill", path).train.image_size == 224


def test_help_shows_the_overlays_merged_defaults():
    shown = subprocess.run([sys.executable, "-m", "pipeline", "--params", "params/imagenet-vit-b-32.yaml", "distill",
                            "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "student input resolution (default: 224)" in text  # the overlay's
    assert "hidden width of the mlp head (default: 512)" in text  # params.yaml's
    assert "(default: ViT-B-32-quickgelu)" in text
