"""Faults: non-finite numbers are refused before they are written or saved."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import cache
from pipeline.errors import PipelineError
from pipeline.shards import MixedBatches, list_shards
from stages import distill, precompute
from tests.conftest import make_tiny_teacher, precompute_config
from tests.test_distill import distill_config


def test_non_finite_teacher_similarities_are_refused_before_writing(demo_shards, tmp_path):
    config, weights = make_tiny_teacher(tmp_path / "teacher", seed=4)
    state = load_file(str(weights))
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    broken = tmp_path / "teacher" / "broken.safetensors"
    save_file(state, str(broken))
    out = tmp_path / "cache.h5"
    with pytest.raises(PipelineError, match=r"train-000000.tar: the teacher gave non-finite similarities"):
        precompute.run(precompute_config(demo_shards, out, (config, broken)))
    assert not out.exists()
    assert not list(cache.parts_dir(out).glob("*.h5"))  # no part holds the NaNs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_shards, tiny_teacher, tmp_path):
    poisoned = tmp_path / "poisoned.h5"
    precompute.run(precompute_config(demo_shards, poisoned, tiny_teacher))
    shards = list_shards(demo_shards, "train")
    last_read = MixedBatches(shards, 16, None, None, seed=0, epoch=0, mix=1).rank_shards()[-1]
    with h5py.File(cache.part_path(poisoned, last_read), "a") as f:  # the last shard read turns NaN
        f["similarities"][:] = np.nan  # (e.g. a bad disk read)
    config = distill_config(demo_shards, poisoned, tiny_teacher, tmp_path / "run",
                            **{"train.epochs": 2, "train.checkpoint_every": 1, "train.mix_shards": 1})
    with pytest.raises(PipelineError, match=r"distill: the loss is nan at epoch 1, step \d+ .*last\.pt keeps"):
        distill.run(config)
    last = torch.load(tmp_path / "run" / "run" / "last.pt", weights_only=True)
    assert last["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "student.pt").exists()
