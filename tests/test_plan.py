"""`python -m pipeline plan`: its figures against what a real small run stores and what the stages
compute, and its FLOPs against torchvision's published count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline import plan as planning
from pipeline import training
from pipeline.cache import TeacherCache
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.linear_probe import probe_memory
from stages import precompute
from tests.conftest import PARAMS, ROOT

PER_CORE = {"distill": 500.0, "precompute": 200.0, "source": "given"}


@pytest.fixture
def run_params(demo_shards, tiny_teacher, tmp_path):
    """params.yaml pointed at the tiny demo shards and the tiny teacher, 4 views, 2 workers."""
    config, weights = tiny_teacher
    params = yaml.safe_load(PARAMS.read_text())
    params["shards"]["out"] = str(demo_shards)
    params["shards"]["max_per_shard"] = 32
    params["teacher"].update(model="", pretrained="", config=str(config), checkpoint=str(weights))
    params["precompute"].update(shards=str(demo_shards), out=str(tmp_path / "cache.h5"), views=4, workers=2,
                                metrics=str(tmp_path / "precompute.json"))
    params["train"].update(shards=str(demo_shards), cache=str(tmp_path / "cache.h5"), workers=2, image_size=32)
    params["probe"].update(workers=2, max_train_images=0)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_plan_of_a_small_run_is_what_the_run_stores_and_what_its_stages_budget(run_params):
    plan = planning.make_plan(run_params, per_core=PER_CORE, gpu_images_per_second=1000,
                              teacher_views_per_second=4000)
    assert plan["counts"] == {"train_images": 96, "val_images": 48, "classes": 48, "anchors": 48, "views": 4,
                              "source": f"{load_config('shards', run_params).out}/manifest.json"}
    precompute.run(load_config("precompute", run_params))
    cache = TeacherCache(load_config("precompute", run_params).out)
    # the cache: the per-view and per-image datasets as stored (HDF5 storage sizes) against the plan's
    # layout formula; the difference is the keys' string heap, estimated at 32 bytes per key
    stored = cache.view_storage_bytes()
    assert abs(plan["cache_bytes"]["full"] - stored) / stored < 0.05, (plan["cache_bytes"]["full"], stored)
    parts = sum(path.stat().st_size for path in cache.part_files)
    assert plan["disk"]["precompute_peak_bytes"] >= stored and parts < 2 * plan["disk"]["precompute_peak_bytes"]
    # shared memory: the stages' own batch sizes x the params' workers and prefetch
    train = load_config("distill", run_params).train
    objective = training.Objective("csm", {}, lambda *a: {}, needs_targets=True, score_name="agreement")
    assert plan["shared_memory"]["distill"]["batch_bytes"] == training.batch_bytes(train, cache, objective)
    assert plan["shared_memory"]["distill"]["per_process_bytes"] == 2 * train.prefetch * training.batch_bytes(
        train, cache, objective)
    config = load_config("precompute", run_params)
    assert plan["shared_memory"]["precompute"]["batch_bytes"] == precompute.precompute_batch_bytes(
        precompute.images_per_batch(config), 4, 32)  # the tiny teacher's 32 px
    # the probe: its own budget for the models' widths (the teacher's embedding from the cache)
    dims = {"teacher": cache.header.embed_dim, "student": 512, "random_init": 512, "supervised": 512,
            "student_embedding": cache.header.embed_dim}
    assert plan["probe"]["cpu"]["host_bytes"] == probe_memory(96, 48, dims, 48, device="cpu").host_bytes
    # cores per GPU: the GPU's rate over the per-core rate (precompute: views per image)
    assert plan["cores_per_gpu_distill"]["cores"] == 1000 / 500
    assert plan["cores_per_gpu_precompute"]["cores"] == 4000 / 4 / 200


def test_the_student_flops_are_torchvisions_published_count(run_params, tmp_path):
    params = yaml.safe_load(run_params.read_text())
    params["train"]["image_size"] = 224
    path = tmp_path / "p224.yaml"
    path.write_text(yaml.safe_dump(params))
    costs = planning.student_costs(path)
    # torchvision's ResNet-18 card: 1.814 G multiply-adds at 224 px; the counter gives 2 FLOPs per one
    published = torchvision_ops() * 1e9 * 2
    assert abs(costs["forward_flops"] - published) / published < 0.005, costs
    assert 2.5 < costs["step_flops"] / costs["forward_flops"] < 3.5  # backward: about twice the forward


def torchvision_ops() -> float:
    import torchvision

    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]


def test_without_shards_the_counts_are_options_and_a_missing_count_is_one_line(tmp_path):
    params = yaml.safe_load(PARAMS.read_text())
    params["shards"]["out"] = str(tmp_path / "absent")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="give the run's counts with --train-images, --val-images and --classes"):
        planning.counts_of(path, 0, 0, 0)
    assert planning.counts_of(path, 1281167, 50000, 1000).train_images == 1281167


def test_the_cli_prints_the_plan_and_writes_its_json(run_params, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"data_path": {"full": {"distill_images_per_second_per_core": 400.0,
                                                        "precompute_images_per_second_per_core": 150.0}}}))
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "pipeline", "--params", str(run_params), "plan",
                             "--gpu-images-per-second", "2000", "--bench-json", str(bench), "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distill: 5.0 CPU cores per GPU to feed 2,000 images/s" in result.stdout
    written = json.loads(out.read_text())
    assert written["data_path_images_per_second_per_core"]["source"] == str(bench)
    assert written["teacher"]["image_size"] == 32 and torch.tensor(written["teacher"]["forward_flops"]) > 0
