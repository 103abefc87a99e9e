"""scripts/clip_benchmark_check.py: CLIP_benchmark reads the datasets it writes, with probe's CPA prompts,
and its zero-shot top-1 on the teacher and the student is probe's own on the same split."""

from __future__ import annotations

import sys
import tarfile

import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset

from pipeline.cache import TeacherCache
from pipeline.errors import PipelineError
from pipeline.shards import ClassInfo, read_classes
from stages import distill, precompute, probe
from tests.conftest import ROOT, precompute_config, stage_config
from tests.test_distill import distill_config

sys.path.insert(0, str(ROOT / "scripts"))  # the script imports its neighbours (results, ablation) by name
import clip_benchmark_check as check  # noqa: E402
import results  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(demo_shards, tiny_teacher, tmp_path_factory):
    """A float32 cache of the tiny teacher, a student distilled for one epoch, and probe's config for both."""
    out = tmp_path_factory.mktemp("clip-benchmark")
    cache = out / "teacher.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher, precision="fp32"))
    distill.run(distill_config(demo_shards, cache, tiny_teacher, out, **{"train.epochs": 1}))
    config, weights = tiny_teacher
    probe_config = stage_config("probe", shards=str(demo_shards), cache=str(cache), student=str(out / "student.pt"),
                                supervised="", out=str(out / "probe.json"), plots=str(out / "plots"),
                                distill_csv="", workers=0, device="cpu", precision="fp32", max_train_images=32,
                                **{"teacher.config": str(config), "teacher.checkpoint": str(weights)})
    return out, probe_config


@pytest.fixture(scope="module")
def checked(tiny_run):
    """The check on the tiny split: its config and figures."""
    out, probe_config = tiny_run
    # a held-out share: its weight-decay sweep runs too (the demo's default fits once, weight decay 0)
    config = check.CheckConfig(probe_config, out / "wds", train_images=96, holdout_fraction=0.1, batch_size=32,
                               epochs=1)
    return config, check.run(config)


def test_the_datasets_are_laid_out_as_clip_benchmark_reads_them(checked, tiny_run):
    config, _ = checked
    root = config.out / "classification"
    for split, images in (("test", 48), ("train", 86), ("val", 10)):  # val: 10% of the 96 train images
        tars = sorted((root / split).glob("*.tar"))
        assert (root / split / "nshards.txt").read_text() == f"{len(tars)}\n"
        assert [t.name for t in tars] == [f"{i}.tar" for i in range(len(tars))]
        with tarfile.open(tars[0]) as tar:
            names = tar.getnames()
        assert len(names) == images * (3 if split == "test" else 2)
        key = names[0].split(".")[0]
        assert {n for n in names if n.startswith(key + ".")} == (
            {f"{key}.jpg", f"{key}.cls", f"{key}.txt"} if split == "test" else {f"{key}.jpg", f"{key}.cls"})
    assert (config.out / "retrieval/dataset_type.txt").read_text() == "retrieval\n"
    assert (config.out / "retrieval/test/nshards.txt").is_file()
    # CLIP_benchmark's builder reads back the classes and templates, and they spell, class by class,
    # the CPA prompts precompute stored in the cache (the strings of its anchors)
    dataset = build_dataset(check.DATASET, root=str(root), split="test")
    cache = TeacherCache(config.probe.cache)
    prompts, classes = cache.prompts(), cache.prompt_classes()
    assert len(dataset.classes) == 48 and len(dataset.templates) == 3
    for index, classname in enumerate(dataset.classes):
        assert [t.format(c=classname) for t in dataset.templates] == [
            p for p, k in zip(prompts, classes.tolist(), strict=True) if k == index]
    assert "a photo of a crane, a kind of bird." in prompts  # the demo's homonyms carry their context


def test_clip_benchmark_zero_shot_is_probes_own_on_the_same_split(checked, tiny_run):
    config, figures = checked
    zero_shot = probe.features_and_zero_shot(config.probe, TeacherCache(config.probe.cache),
                                             read_classes(config.probe.shards), torch.device("cpu"))[3]
    theirs = {"teacher": zero_shot["teacher"]["zeroshot_top1_cpa"], "student": zero_shot["student"]["zeroshot_top1"]}
    assert zero_shot["teacher"]["zeroshot_top1"] == theirs["teacher"]  # the cache holds the CPA class anchors
    for name in check.MODELS:
        assert 100 * abs(figures[name]["zeroshot_top1"] - theirs[name]) <= 0.5, (name, figures[name], theirs)
    assert figures["teacher"]["classifier_cache_min_cosine"] > 0.9999


def test_retrieval_recalls_and_the_linear_probe_are_reported(checked):
    config, figures = checked
    for name in check.MODELS:
        measured = figures[name]
        for kind in ("image", "text"):
            assert 0.0 <= measured[f"{kind}_r1"] <= measured[f"{kind}_r5"] <= 1.0
        assert 0.0 <= measured["linear_top1"] <= measured["linear_top5"] <= 1.0
        assert measured["linear_weight_decay"] > 0  # chosen by its sweep over the held-out split


def test_the_records_render_as_a_study(checked, tmp_path):
    config, figures = checked
    probe_figures = {name: {"zeroshot_top1": figures[name]["zeroshot_top1"], "linear_top1": 0.5}
                     for name in check.MODELS}
    study = tmp_path / "clip-benchmark.json"
    records = check.records(config, figures, probe_figures)
    results.update_study(study, records, check.skeleton(study, config))
    results.update_study(study, records, check.skeleton(study, config))  # a re-run replaces its records
    loaded = results.load_study(study)
    assert [r["label"] for r in loaded["records"]] == ["teacher", "student"]
    assert loaded["records"][0]["figures"]["zeroshot_difference"] == 0.0
    assert loaded["records"][0]["params"]["versions.clip_benchmark"] == "1.6.1"
    assert study.with_suffix(".md").read_text() == results.render_study(loaded, study.name)


def test_prompt_sets_that_classnames_times_templates_cannot_spell_are_refused(tmp_path, tiny_run):
    _, probe_config = tiny_run
    two_contexts = [ClassInfo(0, "crane", "crane", ("bird", "machine")), ClassInfo(1, "red_star", "red star")]
    with pytest.raises(PipelineError, match="2 contexts"):
        check.benchmark_prompts(two_contexts, probe_config)
    cpa = tmp_path / "cpa.txt"
    cpa.write_text("a photo of a {name}, a kind of {context}.\na {context} called {name}.\n"
                   "an image of a {name}, a kind of {context}.\n")
    one_context = [ClassInfo(0, "crane", "crane", ("bird",)), ClassInfo(1, "red_star", "red star")]
    with pytest.raises(PipelineError, match="cannot spell"):
        check.benchmark_prompts(one_context, stage_config("probe", **{"prompts.cpa_templates": str(cpa)}))


def test_the_hold_out_split_keeps_every_class_in_train():
    samples = [{"cls": str(label).encode()} for label in [0] * 9 + [1] + [2] * 2]
    train, held = check.holdout_split(samples, 0.5, seed=0)
    assert len(held) == 6 and len(train) == 6
    assert {int(s["cls"]) for s in train} == {0, 1, 2}
