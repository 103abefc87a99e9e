"""Configs: params.yaml is complete, unknown keys are errors, overrides are type-checked."""

from __future__ import annotations

import pytest

from pipeline.config import STAGE_CONFIGS, load_config, override, read_params
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
