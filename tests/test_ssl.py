"""The SSL baselines (pipeline/ssl.py, `python -m pipeline ssl`): lightly's losses by hand, BYOL's
momentum target, training and resuming through the distill loop, and probe's baseline rows."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from pipeline import ssl
from pipeline.errors import PipelineError
from pipeline.student import load_student
from stages import precompute, probe
from stages import ssl as ssl_stage
from tests.conftest import ROOT, precompute_config, run_with_fault, stage_config


def test_simclr_loss_is_nt_xent_by_hand_and_pair_top1_counts_partners():
    # 3 images, two views each, stacked [first views; second views]
    output = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [0.1, 1.0], [1.0, 0.1]])
    temperature = 0.5
    terms = ssl.simclr_loss(temperature)(output, {})
    z = torch.nn.functional.normalize(output, dim=1)
    n = 3
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = [math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i]
        total -= math.log(math.exp(float(z[i] @ z[partner]) / temperature) / sum(logits))
    assert terms["loss"].item() == pytest.approx(total / (2 * n), rel=1e-5)
    # nearest other view (cosines): 0 -> 5 (0.995; its partner is 3), 1 -> 4 (0.995, its partner),
    # 2 -> 3 (0.96; partner 5), 3 -> 2 (0.96; partner 0), 4 -> 1 (partner), 5 -> 0 (0.995; partner 2)
    assert terms["pair_top1"].item() == pytest.approx(2 / 6)


def test_byol_loss_is_the_symmetric_negative_cosine_of_prediction_and_the_other_views_target():
    p1, z1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p2, z2 = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    output = torch.cat([torch.cat([p1, z1], 1), torch.cat([p2, z2], 1)])
    terms = ssl.byol_loss()(output, {})
    expected = -0.5 * (1.0 + 0.8)  # cos(p1, z2) = 1, cos(p2, z1) = 0.8
    assert terms["loss"].item() == pytest.approx(expected)
    assert terms["cosine"].item() == pytest.approx(0.9)


def byol_spec():
    return {"arch": "resnet18", "out_dim": 16, "head": "byol", "head_hidden": 32, "normalize_output": False}


def test_byol_target_moves_toward_the_online_network_by_its_momentum_and_takes_no_gradient():
    torch.manual_seed(0)
    model = ssl.SelfSupervised(byol_spec())
    online, target = model.student.head.layers[0].weight, model.target.head.layers[0].weight
    assert torch.equal(online, target)  # the target starts as a copy
    with torch.no_grad():
        online.add_(1.0)
    before = target.detach().clone()
    model.after_step(0, 10, 0.9)  # step 0 of 10: momentum 0.9
    assert torch.allclose(target, 0.9 * before + 0.1 * online, atol=1e-6)
    after_first = target.detach().clone()
    model.after_step(10, 10, 0.9)  # the last step: momentum 1, the target stays
    assert torch.equal(target, after_first)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ssl.byol_loss()(model(pixels), {})["loss"].backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert model.student.head.layers[0].weight.grad is not None and model.prediction.layers[0].weight.grad is not None


@pytest.fixture(scope="module")
def two_view_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, views=2))
    return out


def ssl_config(demo_shards, cache, directory, method, **changes):
    return stage_config("ssl", method=method, out=str(directory / "ssl.pt"), run_dir=str(directory / "run"),
                        metrics=str(directory / "ssl.json"), plot=str(directory / "ssl.csv"),
                        projection_dim=16, projection_hidden=32,
                        train__shards=str(demo_shards), train__cache=str(cache), train__image_size=32,
                        train__batch_size=16, train__epochs=2, train__workers=0, **changes)


def test_simclr_trains_on_two_cached_views_and_probe_probes_its_backbone(demo_shards, two_view_cache,
                                                                        tiny_teacher, tmp_path):
    config = ssl_config(demo_shards, two_view_cache, tmp_path, "simclr")
    metrics = ssl_stage.run(config)
    assert metrics["epochs"] == 2 and metrics["final_loss"] < metrics["first_epoch_loss"]
    history = (tmp_path / "ssl.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,pair_top1") and len(history) == 3
    model, checkpoint = load_student(config.out)
    assert checkpoint["model"]["head"] == "simclr" and model.feature_dim == 512
    assert checkpoint["ssl"]["method"] == "simclr"

    # probe: the baseline is one more row, its backbone fitted like the student's
    teacher_config, weights = tiny_teacher
    distilled = tmp_path / "student.pt"
    from stages import distill

    distill.run(stage_config("distill", out=str(distilled), run_dir=str(tmp_path / "distill-run"),
                             metrics=str(tmp_path / "d.json"), plot=str(tmp_path / "d.csv"),
                             train__shards=str(demo_shards), train__cache=str(two_view_cache), train__image_size=32,
                             train__batch_size=16, train__epochs=1, train__workers=0,
                             teacher__config=str(teacher_config), teacher__checkpoint=str(weights)))
    result = probe.run(stage_config("probe", shards=str(demo_shards), cache=str(two_view_cache),
                                    student=str(distilled), supervised="", baselines=f"simclr={config.out}",
                                    out=str(tmp_path / "probe.json"), plots=str(tmp_path / "plots"),
                                    distill_csv="", workers=0, teacher__config=str(teacher_config),
                                    teacher__checkpoint=str(weights)))
    assert set(result["simclr"]) == {"linear_top1", "linear_top5"}
    assert json.loads((tmp_path / "probe.json").read_text())["simclr"] == result["simclr"]
    # its features are the trained backbone's, not the random init's: the fit differs
    assert result["simclr"] != result["random_init"]


def test_a_one_view_cache_is_refused_in_one_line(demo_shards, tiny_teacher, tmp_path):
    cache = tmp_path / "one-view.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher, views=1))
    with pytest.raises(PipelineError, match="holds 1 view per image; an SSL baseline needs two"):
        ssl_stage.run(ssl_config(demo_shards, cache, tmp_path, "simclr"))


@pytest.mark.slow
def test_a_killed_byol_run_resumes_to_the_weights_of_an_uninterrupted_one(demo_shards, two_view_cache, tmp_path):
    """The momentum target and the predictor are in the run's checkpoint: a resumed BYOL run
    ends bit for bit where an uninterrupted one does."""
    args = [sys.executable, "-m", "pipeline", "ssl", "--method", "byol", "--shards", str(demo_shards),
            "--cache", str(two_view_cache), "--image-size", "32", "--batch-size", "16", "--epochs", "2",
            "--workers", "0", "--checkpoint-every", "2", "--projection-dim", "16", "--projection-hidden", "32"]

    def outputs(name):
        d = tmp_path / name
        return ["--out", str(d / "ssl.pt"), "--run-dir", str(d / "run"), "--metrics", str(d / "m.json"),
                "--plot", str(d / "p.csv")]

    killed = run_with_fault(args + outputs("killed"), "kill-after-step:5", tmp_path / "kill.log")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = torch.load(tmp_path / "killed" / "run" / "last.pt", weights_only=True)
    assert state["global_step"] == 4 and any(k.startswith("target.") for k in state["model"])
    runs = {name: subprocess.run(args + outputs(name), cwd=ROOT, capture_output=True, text=True, timeout=300)
            for name in ("killed", "clean")}
    assert all(done.returncode == 0 for done in runs.values()), runs["killed"].stderr[-2000:]
    assert "resuming byol at epoch 1, step 4" in runs["killed"].stderr
    resumed = torch.load(tmp_path / "killed" / "ssl.pt", weights_only=True)["state_dict"]
    clean = torch.load(tmp_path / "clean" / "ssl.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == clean.keys() and not any(k.startswith("target.") for k in clean)
    assert all(torch.equal(resumed[k], clean[k]) for k in clean)
