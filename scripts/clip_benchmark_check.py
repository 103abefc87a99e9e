"""An outside harness checks the probe's figures: CLIP_benchmark on the same images and prompts.

`probe` measures zero-shot and linear-probe accuracy with the project's own code. This script
asks CLIP_benchmark (its own evaluation functions, unchanged) the same questions:

1. writes the shards' val split as a CLIP_benchmark webdataset (`wds/<name>`: test/nshards.txt,
   test/0.tar ..., each sample its image bytes as stored, `.cls` and `.txt`; classnames.txt and
   zeroshot_classification_templates.txt), the train images probe fits its linear probe on (train/,
   and val/: a held-out share that scores CLIP_benchmark's weight-decay sweep, as probe holds one out
   to choose its L2 strength), and the val split once more as a retrieval dataset (dataset_type.txt
   says "retrieval"; the captions are the `.txt`);
2. builds the student and the teacher as SmallCLIP models (float32, the evaluation view);
3. runs zeroshot_classification.evaluate, linear_probe.evaluate and zeroshot_retrieval.evaluate
   on both, on the CPU with amp=False;
4. prints them beside probe's figures (metrics/probe.json) and records them, with the settings
   and package versions, in docs/results/clip-benchmark.json (its page rendered by
   scripts/results.py).

    python scripts/clip_benchmark_check.py                       # params.yaml's probe section
    python scripts/clip_benchmark_check.py --train-images 1000 --holdout-fraction 0 --json ""

The prompts. CLIP_benchmark's classifier of a class is the mean of the L2-normalised embeddings
of `template.format(c=classname)` over the templates, renormalised: probe's class anchor
(`pipeline.prompts.anchor_embeddings`) when the strings are the same. A CPA prompt is a CPA
template filled with the class's name and context; the CPA templates are the plain ones with
"{name}" widened to "{name}, a kind of {context}", so the class names written are the names
with their context ("crane, a kind of bird"; a class without one keeps its name) and the
templates the plain ones ("a photo of a {c}."). `benchmark_prompts` derives this and checks
every class's strings against `build_prompt_set`'s; a prompt set that classnames x templates
cannot spell (a class with two contexts) is an error. What still differs from probe is the
arithmetic: probe's anchors (the cache's, encoded by precompute) and image features run under
bf16 autocast where the CPU has native bf16 (--precision), CLIP_benchmark's here in float32; the
record keeps the least cosine between its classifier and the cache's anchors.

Two shims let CLIP_benchmark 1.6.1 run here, its code otherwise untouched: its linear probe
asserts `device == "cuda"` and calls `.cuda()` (`cuda_calls_on_the_cpu` keeps it on the CPU), and
its `accuracy` fails under NumPy 2.4 (`numpy2_accuracy` swaps in a copy with one change).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import results  # scripts/results.py, the one renderer of docs/results (run as a script, its folder is on sys.path)
import torch
import webdataset as wds
from ablation import code_version, machine
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import linear_probe, zeroshot_classification, zeroshot_retrieval

from pipeline.cache import TeacherCache
from pipeline.config import DEFAULT_PARAMS, ProbeConfig, load_config, override
from pipeline.errors import PipelineError
from pipeline.prompts import build_prompt_set, read_templates
from pipeline.shards import TAR_MTIME, ClassInfo, decode_sample, iter_raw, list_shards, read_classes
from pipeline.small_clip import SmallCLIP
from pipeline.student import load_student
from pipeline.teacher import load_teacher, teacher_identity

log = logging.getLogger("clip_benchmark_check")

DATASET = "wds/csm"  # the name CLIP_benchmark is given; `wds/` makes it read the folder as a webdataset
SAMPLES_PER_TAR = 1000
RECALL_K = (1, 5)
MODELS = ("teacher", "student")
STUDY = Path("docs/results/clip-benchmark.json")
IMAGE_EXTENSIONS = {b"\xff\xd8": "jpg", b"\x89PNG": "png", b"RIFF": "webp"}  # what CLIP_benchmark decodes


@dataclass(frozen=True)
class CheckConfig:
    """The check's settings: probe's section (shards, cache, student, teacher, prompts, its metrics
    file, hold-out share and seed) and CLIP_benchmark's options (its CLI's defaults otherwise)."""

    probe: ProbeConfig
    out: Path  # where the webdatasets are written
    train_images: int  # the linear probe's train images, the first of the train split (0: all)
    holdout_fraction: float  # > 0: that share of them scores its weight-decay sweep; 0: weight decay 0
    batch_size: int = 64  # CLIP_benchmark's --batch_size: image batches and the linear probe's steps
    workers: int = 0
    lr: float = 0.1  # --fewshot_lr
    epochs: int = 10  # --fewshot_epochs
    fewshot_k: int = -1  # --fewshot_k: -1, every train image


# --- prompts -----------------------------------------------------------------------------------

def benchmark_prompts(classes: Sequence[ClassInfo], config: ProbeConfig) -> tuple[list[str], list[str]]:
    """CLIP_benchmark's classnames and templates whose strings, class by class, are probe's CPA prompts."""
    prompts = config.prompts
    plain = read_templates(prompts.plain_templates, ["name"], "--prompts-plain-templates")
    templates = [template.replace("{name}", "{c}") for template in plain]
    phrase = None
    if any(cls.contexts for cls in classes):
        cpa = read_templates(prompts.cpa_templates, ["name", "context"], "--prompts-cpa-templates")
        phrase = context_phrase(plain, cpa, prompts.cpa_templates)
    classnames = []
    for cls in classes:
        if len(cls.contexts) > 1:
            raise PipelineError(f"class {cls.index} ({cls.name}) has {len(cls.contexts)} contexts: CLIP_benchmark's "
                                "templates give one class name each, so its CPA prompts cannot be written as such")
        classnames.append(phrase.format(name=cls.name, context=cls.contexts[0]) if cls.contexts else cls.name)
    expected = build_prompt_set(classes, replace(prompts, set="cpa", anchors="class"))
    for cls, classname in zip(classes, classnames, strict=True):
        mine = [template.format(c=classname) for template in templates]
        theirs = [p for p, k in zip(expected.prompts, expected.prompt_classes, strict=True) if k == cls.index]
        if mine != theirs:
            raise PipelineError(f"class {cls.index}: CLIP_benchmark's prompts {mine} are not probe's CPA prompts "
                                f"{theirs}; the templates of {prompts.plain_templates} and {prompts.cpa_templates} "
                                "do not pair up")
    return classnames, templates


def context_phrase(plain: Sequence[str], cpa: Sequence[str], where: str) -> str:
    """The phrase P with cpa[j] == plain[j] with "{name}" replaced by P, for every j (e.g.
    "{name}, a kind of {context}"); an error when the two template files do not pair up so."""
    first = plain[0].split("{name}")
    if len(plain) != len(cpa) or len(first) != 2:
        raise PipelineError(f"{where}: CPA templates must be the plain templates, one for one, with {{name}} widened "
                            f"to a phrase with {{context}} ({len(cpa)} CPA, {len(plain)} plain templates)")
    before, after = first
    phrase = cpa[0][len(before):len(cpa[0]) - len(after)]
    for p, c in zip(plain, cpa, strict=True):
        if p.replace("{name}", phrase) != c:
            raise PipelineError(f"{where}: {c!r} is not {p!r} with {{name}} widened to {phrase!r}; CLIP_benchmark's "
                                "class names x templates cannot spell these prompts")
    return phrase


# --- the webdatasets ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkData:
    classification: Path  # test/ (the val split), train/ and val/ (the linear probe's), classnames, templates
    retrieval: Path  # test/ (the val split with captions), dataset_type.txt


def labelled_samples(shards: Sequence[Path], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of `shards` in file order that probe reads too (decodable, labelled), at most `limit`."""
    count = 0
    for number, shard in enumerate(shards):
        for position, raw in enumerate(iter_raw(shard)):
            if limit is not None and count >= limit:
                return
            sample = decode_sample(raw, number, position)
            if sample.image is None:
                continue  # corrupt: probe leaves it out too
            if sample.label < 0:
                raise PipelineError(f"{shard}: sample {sample.key} has no class; the check needs labelled shards")
            count += 1
            yield raw


def image_extension(data: bytes, key: str) -> str:
    for magic, extension in IMAGE_EXTENSIONS.items():
        if data.startswith(magic):
            return extension
    raise PipelineError(f"sample {key}: image bytes are neither JPEG, PNG nor WebP; CLIP_benchmark cannot read them")


def write_split(samples: Sequence[dict[str, Any]], directory: Path, captions: bool) -> None:
    """CLIP_benchmark's split folder: 0.tar, 1.tar ... and nshards.txt; each sample its image bytes
    as stored, `.cls` and (with `captions`) `.txt`. Fixed member times: byte-identical re-runs."""
    directory.mkdir(parents=True)
    tars = max(1, -(-len(samples) // SAMPLES_PER_TAR))
    for number in range(tars):
        with open(directory / f"{number}.tar", "wb") as stream:
            writer = wds.TarWriter(stream, mtime=TAR_MTIME, user="csm", group="csm")
            for raw in samples[number * SAMPLES_PER_TAR:(number + 1) * SAMPLES_PER_TAR]:
                key = raw["__key__"]
                sample = {"__key__": key, image_extension(raw["jpg"], key): raw["jpg"], "cls": raw["cls"]}
                if captions:
                    if "txt" not in raw:
                        raise PipelineError(f"sample {key}: no caption; retrieval needs a caption on every val image")
                    sample["txt"] = raw["txt"]
                writer.write(sample)
            writer.close()
    (directory / "nshards.txt").write_text(f"{tars}\n")


def holdout_split(samples: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) for CLIP_benchmark's weight-decay sweep: a seeded `fraction` of the samples for val,
    never a class's last train sample (its final fit on train + val sizes the classifier by train)."""
    labels = [int(raw["cls"].decode()) for raw in samples]
    left = {label: labels.count(label) for label in set(labels)}
    wanted, held = round(fraction * len(samples)), set()
    for i in np.random.default_rng(seed).permutation(len(samples)).tolist():
        if len(held) < wanted and left[labels[i]] > 1:
            held.add(i)
            left[labels[i]] -= 1
    return ([raw for i, raw in enumerate(samples) if i not in held],
            [raw for i, raw in enumerate(samples) if i in held])


def write_datasets(config: CheckConfig, classnames: Sequence[str], templates: Sequence[str]) -> BenchmarkData:
    """The webdatasets CLIP_benchmark reads, written afresh under `config.out`."""
    data = BenchmarkData(config.out / "classification", config.out / "retrieval")
    for root in (data.classification, data.retrieval):
        if root.exists():
            shutil.rmtree(root)
    shards = config.probe.shards
    val = list(labelled_samples(list_shards(shards, "val")))
    train = list(labelled_samples(list_shards(shards, "train"), config.train_images or None))
    fit, holdout = holdout_split(train, config.holdout_fraction, config.probe.seed)
    write_split(val, data.classification / "test", captions=True)
    write_split(fit, data.classification / "train", captions=False)
    if holdout:
        write_split(holdout, data.classification / "val", captions=False)
    for name, lines in (("classnames.txt", classnames), ("zeroshot_classification_templates.txt", templates)):
        (data.classification / name).write_text("".join(f"{line}\n" for line in lines))
    write_split(val, data.retrieval / "test", captions=True)
    (data.retrieval / "dataset_type.txt").write_text("retrieval\n")
    log.info("wrote %d val images (test/), %d + %d train images (train/, val/) to %s", len(val), len(fit),
             len(holdout), config.out)
    return data


# --- CLIP_benchmark ----------------------------------------------------------------------------

class CpuCalledCuda(str):
    """The device "cpu" that compares equal to "cuda": `linear_probe.evaluate` asserts
    `device == "cuda"`, then moves batches with `.to(device)`, which reads the string."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__


@contextlib.contextmanager
def cuda_calls_on_the_cpu() -> Iterator[str]:
    """CLIP_benchmark's linear probe, unchanged, on the CPU: `.cuda()` of tensors and modules is the
    identity while it runs, and the device it is given compares equal to "cuda". Its
    DataParallel wraps nothing where no CUDA device is visible, hence the check."""
    if torch.cuda.is_available():
        raise PipelineError("a CUDA device is visible; run with CUDA_VISIBLE_DEVICES= so that CLIP_benchmark's "
                            "linear probe stays on the CPU with the models")
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        with warnings.catch_warnings():  # its loaders pin memory: nothing to pin for on a CPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            yield CpuCalledCuda("cpu")
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark 1.6.1's `zeroshot_classification.accuracy` with one change: each count of hits
    becomes a number by `.item()`; its `float()` of a one-element 1-d array is a TypeError from
    NumPy 2.4 on (this venv has 2.4), so its zero-shot and linear probe would stop there."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0).item()) / n for k in topk]


@contextlib.contextmanager
def numpy2_accuracy() -> Iterator[None]:
    """`accuracy` in place of CLIP_benchmark's own, in the two modules that call it, while it runs."""
    saved = zeroshot_classification.accuracy, linear_probe.accuracy
    zeroshot_classification.accuracy = linear_probe.accuracy = accuracy
    try:
        yield
    finally:
        zeroshot_classification.accuracy, linear_probe.accuracy = saved


def loader(root: Path, model: SmallCLIP, split: str, batch_size: int, workers: int, batched: bool,
           task: str = "zeroshot_classification"):
    """A split read by CLIP_benchmark's builder for `task`, loaded as its CLI loads it (`batched`: the
    evaluated split, batched by webdataset; otherwise the linear probe's train and val splits)."""
    with warnings.catch_warnings():  # its builder leaves WebDataset's shardshuffle unset: no shuffling
        warnings.filterwarnings("ignore", message=".*shardshuffle.*")
        dataset = build_dataset(DATASET, root=str(root), transform=model.preprocess, split=split, task=task)
    if batched:
        return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                           num_workers=workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def benchmark(model: SmallCLIP, name: str, data: BenchmarkData, config: CheckConfig) -> dict[str, Any]:
    """CLIP_benchmark's zero-shot classification, linear probe and retrieval of one model."""
    test = loader(data.classification, model, "test", config.batch_size, config.workers, batched=True)
    classnames, templates = test.dataset.classes, test.dataset.templates
    retrieval_test = loader(data.retrieval, model, "test", config.batch_size, config.workers, batched=True,
                            task="zeroshot_retrieval")
    train = loader(data.classification, model, "train", config.batch_size, config.workers, batched=False)
    val = (loader(data.classification, model, "val", config.batch_size, config.workers, batched=False)
           if (data.classification / "val").is_dir() else None)  # None: weight decay 0, as its CLI's default
    printed = io.StringIO()  # its linear probe's training loop prints a line every 20 steps
    with numpy2_accuracy(), tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(config.probe.seed)  # as its CLI does before a task
        classifier = Path(scratch) / "classifier.pt"  # the classifier it builds, kept (its --save_clf)
        zero_shot = zeroshot_classification.evaluate(model, test, model.tokenizer, classnames, templates, "cpu",
                                                     amp=False, save_clf=str(classifier))
        torch.manual_seed(config.probe.seed)
        retrieval = zeroshot_retrieval.evaluate(model, retrieval_test, model.tokenizer, "cpu", amp=False,
                                                recall_k_list=list(RECALL_K))
        torch.manual_seed(config.probe.seed)
        # a fresh feature folder: it reuses the features it finds there, whatever model made them
        with cuda_calls_on_the_cpu() as device, contextlib.redirect_stdout(printed):
            linear = linear_probe.evaluate(model, train, test, config.fewshot_k, config.batch_size, config.workers,
                                           config.lr, config.epochs, name, config.probe.seed,
                                           str(Path(scratch) / "features"), device, val_dataloader=val,
                                           normalize=True, amp=False)
        classifier = torch.load(classifier, weights_only=True)
    log.debug("%s linear probe:\n%s", name, printed.getvalue())
    if linear is None:
        raise PipelineError(f"CLIP_benchmark's linear probe: fewer than {config.fewshot_k} train images in a class; "
                            "raise --train-images or lower --fewshot-k")
    return {"zeroshot": zero_shot, "linear": linear, "retrieval": retrieval, "classifier": classifier}


def anchor_agreement(classifier: torch.Tensor, anchors: torch.Tensor) -> float:
    """The least cosine, over classes, between CLIP_benchmark's classifier (D, C) and class anchors (C, D)."""
    return float(torch.nn.functional.cosine_similarity(classifier.T.float(), anchors.float(), dim=-1).min())


# --- the run -----------------------------------------------------------------------------------

def probe_figures(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """probe's figures the check compares with: zero-shot with CPA class anchors, the linear probe on
    the features CLIP_benchmark sees (`encode_image`: the student's projected embedding)."""
    teacher, student = metrics["teacher"], metrics["student"]
    return {"teacher": {"zeroshot_top1": teacher.get("zeroshot_top1_cpa", teacher["zeroshot_top1"]),
                        "linear_top1": teacher["linear_top1"]},
            "student": {"zeroshot_top1": student["zeroshot_top1"],
                        "linear_top1": student.get("linear_top1_embedding", student["linear_top1"]),
                        "linear_top1_backbone": student["linear_top1"]}}


def run(config: CheckConfig) -> dict[str, dict[str, float]]:
    """Write the datasets, benchmark the teacher and the student; their figures as fractions."""
    started = time.perf_counter()
    classes = read_classes(config.probe.shards)
    classnames, templates = benchmark_prompts(classes, config.probe)
    data = write_datasets(config, classnames, templates)
    cache = TeacherCache(config.probe.cache)
    cpa_class_anchors = (cache.header.prompt_set, cache.header.anchor_mode) == ("cpa", "class")
    if not cpa_class_anchors:
        log.warning("%s holds %s prompts with %s anchors: probe's student zero-shot is not scored against the "
                    "CPA class anchors CLIP_benchmark builds", cache.path, cache.header.prompt_set,
                    cache.header.anchor_mode)
    teacher = load_teacher(config.probe.teacher, "cpu", precision="fp32")
    # the identity without precision: the cache's teacher ran at probe's precision, this one in float32
    cache.require(teacher_identity=teacher_identity(config.probe.teacher), fix="pass the cache this teacher made")
    student, checkpoint = load_student(config.probe.student)
    cache.require_student(config.probe.student, checkpoint,
                          fix="pass the student distilled from this cache (--student)")
    models = {"teacher": SmallCLIP.from_teacher(teacher),
              "student": SmallCLIP(student, int(checkpoint["image_size"]), teacher)}
    figures: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        log.info("%s: CLIP_benchmark zero-shot, retrieval and linear probe", name)
        model_started = time.perf_counter()
        measured = benchmark(model, name, data, config)
        zero_shot, linear, retrieval = measured["zeroshot"], measured["linear"], measured["retrieval"]
        figures[name] = {"zeroshot_top1": zero_shot["acc1"], "zeroshot_top5": zero_shot["acc5"],
                         "zeroshot_mean_per_class_recall": float(zero_shot["mean_per_class_recall"]),
                         "linear_top1": linear["lp_acc1"], "linear_top5": linear["lp_acc5"],
                         "linear_weight_decay": linear["weight_decay"],
                         **{f"{kind}_r{k}": retrieval[f"{kind}_retrieval_recall@{k}"]
                            for kind in ("image", "text") for k in RECALL_K},
                         "seconds": time.perf_counter() - model_started}
        if cpa_class_anchors:  # the anchors probe scores the student against
            figures[name]["classifier_cache_min_cosine"] = anchor_agreement(measured["classifier"], cache.anchors())
    log.info("the check took %.0f s", time.perf_counter() - started)
    return figures


def percent(fraction: float) -> float:
    return round(100 * fraction, 4)


UNITS = {
    "zeroshot_top1": "% of the val images (top-1), CLIP_benchmark zeroshot_classification",
    "probe_zeroshot_top1": "% of the val images (top-1), probe: CPA class anchors",
    "zeroshot_difference": "points, CLIP_benchmark minus probe",
    "zeroshot_top5": "% of the val images (top-5), CLIP_benchmark",
    "zeroshot_mean_per_class_recall": "% (mean per-class recall), CLIP_benchmark",
    "linear_top1": "% of the val images (top-1), CLIP_benchmark linear_probe",
    "probe_linear_top1": "% of the val images (top-1), probe: on the image embedding",
    "linear_top5": "% of the val images (top-5), CLIP_benchmark linear_probe",
    "linear_weight_decay": "AdamW weight decay CLIP_benchmark's sweep chose",
    "image_r1": "% of the val captions whose image is ranked first (text to image), CLIP_benchmark",
    "image_r5": "% of the val captions whose image is in the top 5 (text to image), CLIP_benchmark",
    "text_r1": "% of the val images whose caption is ranked first (image to text), CLIP_benchmark",
    "text_r5": "% of the val images whose caption is in the top 5 (image to text), CLIP_benchmark",
    "classifier_cache_min_cosine": "cosine, the least over classes",
    "seconds": "s of CLIP_benchmark's three evaluations of the model",
}


UNSCALED = ("linear_weight_decay", "classifier_cache_min_cosine", "seconds")  # not fractions


def records(config: CheckConfig, figures: dict[str, dict[str, float]],
            probe: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One study record per model: the settings, the versions, CLIP_benchmark's figures and probe's."""
    versions = {f"versions.{package.replace('-', '_')}": importlib.metadata.version(package)
                for package in ("clip-benchmark", "torch", "webdataset", "open_clip_torch")}
    settings = {"probe.shards": config.probe.shards, "probe.cache": config.probe.cache,
                "probe.student": config.probe.student, "probe.out": config.probe.out,
                "teacher.identity": teacher_identity(config.probe.teacher),
                "prompts.set": "cpa", "prompts.anchors": "class",
                "check.train_images": config.train_images, "check.holdout_fraction": config.holdout_fraction,
                "check.seed": config.probe.seed, "check.batch_size": config.batch_size, "check.lr": config.lr,
                "check.epochs": config.epochs, "check.fewshot_k": config.fewshot_k, "check.device": "cpu",
                "check.amp": False, **versions}
    rows = []
    for name in MODELS:
        measured = figures[name]
        row = {key: value if key in UNSCALED else percent(value) for key, value in measured.items()}
        row["seconds"] = round(measured["seconds"], 1)
        row.update(probe_zeroshot_top1=percent(probe[name]["zeroshot_top1"]),
                   probe_linear_top1=percent(probe[name]["linear_top1"]))
        row["zeroshot_difference"] = round(row["zeroshot_top1"] - row["probe_zeroshot_top1"], 4)
        rows.append({"label": name, "params": {"check.model": name, **settings}, "figures": row,
                     "machine": machine(torch.device("cpu")), "commit": code_version(),
                     "measured": date.today().isoformat(), "source": "scripts/clip_benchmark_check.py"})
    return rows


def skeleton(path: Path, config: CheckConfig) -> dict[str, Any]:
    """A new study file: one row per model, CLIP_benchmark's figures beside probe's."""
    figures = [("zero-shot top-1, CLIP_benchmark", "zeroshot_top1"), ("zero-shot top-1, probe", "probe_zeroshot_top1"),
               ("difference", "zeroshot_difference"), ("linear top-1, CLIP_benchmark", "linear_top1"),
               ("linear top-1, probe", "probe_linear_top1"), ("text to image R@1", "image_r1"),
               ("text to image R@5", "image_r5"), ("image to text R@1", "text_r1"),
               ("image to text R@5", "text_r5")]
    return {
        "study": path.stem,
        "title": "CLIP_benchmark checks the probe's figures",
        "description": "`python scripts/clip_benchmark_check.py` writes the demo's val split as a CLIP_benchmark "
                       "webdataset (classnames and templates spelling probe's CPA prompts) and runs CLIP_benchmark's "
                       "own zeroshot_classification, linear_probe and zeroshot_retrieval on the teacher and the "
                       "student (SmallCLIP: float32, the evaluation view, the teacher's text tower), on the CPU with "
                       "amp off; probe's figures are the committed metrics/probe.json.",
        "columns": [{"header": "model", "field": "label"},
                    *({"header": header, "figure": figure} for header, figure in figures),
                    {"header": "measured", "field": "measured"}],
        "units": UNITS,
        "records": [],
        "notes": [
            "Zero-shot: the same strings and the same anchor formula (per class the mean of the L2-normalised "
            "prompt embeddings, renormalised); probe encodes the prompts and the images under bf16 autocast where "
            "the CPU runs bf16 natively (its --precision), CLIP_benchmark here in float32. The classifier matches the "
            "cache's anchors to the cosine `classifier_cache_min_cosine` of the record.",
            "Linear probe: CLIP_benchmark's protocol on "
            + (f"the first {config.train_images:,}" if config.train_images else "all")
            + f" train images (fewshot_k "
            f"{config.fewshot_k}, AdamW lr {config.lr}, {config.epochs} epochs, batch {config.batch_size}, cosine "
            "schedule, L2-normalised image embeddings; "
            + (f"weight decay swept over 1e-6..1e2 in 19 fits scored on a held-out {config.holdout_fraction:.0%} of "
               "them, then one fit on all of them" if config.holdout_fraction else
               "weight decay 0 and one fit, its CLI's default without a validation split")
            + "); probe fits L-BFGS logistic regression on standardised features of "
            + (f"its first {config.probe.max_train_images:,}" if config.probe.max_train_images else "all")
            + " train images, the L2 strength chosen on a held-out share. "
            "CLIP_benchmark 1.6.1 asserts a CUDA device for it: the script runs its code unchanged on the CPU "
            "(`cuda_calls_on_the_cpu`), and replaces its `accuracy` by a copy that NumPy 2.4 accepts "
            "(`numpy2_accuracy`).",
            "Retrieval: one caption per val image, CLIP_benchmark's recall (only an image's own caption counts). Demo "
            "captions repeat (2,000 val images, 1,608 distinct captions): identical captions rank the images "
            "identically, so at most one image of each caption scores and R@1 cannot exceed 80.4 either way. The "
            "student was distilled on its similarities to the 48 class anchors only, which say nothing of an image's "
            "position or background.",
        ],
    }


def print_table(figures: dict[str, dict[str, float]], probe: dict[str, dict[str, float]]) -> None:
    print()
    print(f"{'model':<8} {'figure':<24} {'CLIP_benchmark':>14} {'probe':>8} {'difference':>10}")
    for name in MODELS:
        measured, theirs = figures[name], probe[name]
        for label, key in (("zero-shot top-1 (CPA)", "zeroshot_top1"), ("linear top-1", "linear_top1")):
            mine = 100 * measured[key]
            print(f"{name:<8} {label:<24} {mine:>14.2f} {100 * theirs[key]:>8.2f} {mine - 100 * theirs[key]:>+10.2f}")
        for k in RECALL_K:
            print(f"{name:<8} {f'text to image R@{k}':<24} {100 * measured[f'image_r{k}']:>14.2f}")
            print(f"{name:<8} {f'image to text R@{k}':<24} {100 * measured[f'text_r{k}']:>14.2f}")
    if "linear_top1_backbone" in probe["student"]:
        print(f"(probe's student linear top-1 on its pooled backbone features: "
              f"{100 * probe['student']['linear_top1_backbone']:.2f})")
    if "classifier_cache_min_cosine" in figures["teacher"]:
        print(f"CLIP_benchmark's classifier against the cache's anchors: least cosine "
              f"{figures['teacher']['classifier_cache_min_cosine']:.6f}")
    print("time: " + ", ".join(f"{name} {figures[name]['seconds']:.0f} s" for name in MODELS))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Options without a default here take the params file's probe section.")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: %(default)s)")
    parser.add_argument("--shards", help="shard directory (probe.shards)")
    parser.add_argument("--student", help="distilled student checkpoint (probe.student)")
    parser.add_argument("--cache", help="teacher cache: its teacher and anchors (probe.cache)")
    parser.add_argument("--probe-metrics", help="probe's metrics to compare with (probe.out)")
    parser.add_argument("--teacher-config", help="teacher JSON config (probe's teacher.config)")
    parser.add_argument("--teacher-checkpoint", help="teacher weights (probe's teacher.checkpoint)")
    parser.add_argument("--teacher-model", help="open_clip model name (probe's teacher.model)")
    parser.add_argument("--teacher-pretrained", help="open_clip pretrained tag (probe's teacher.pretrained)")
    parser.add_argument("--out", type=Path, default=Path("data/cache/clip-benchmark"),
                        help="where the webdatasets are written, replaced on every run (default: %(default)s)")
    parser.add_argument("--train-images", type=int,
                        help="the linear probe's train images, the first of the train split, 0: all; probe's own "
                             "(probe.max_train_images)")
    parser.add_argument("--holdout-fraction", type=float,
                        help="share of them held out to score CLIP_benchmark's weight-decay sweep, then fitted on "
                             "too; 0: no sweep, weight decay 0, its CLI's default (probe.holdout_fraction)")
    parser.add_argument("--seed", type=int, help="seed of the hold-out split and of CLIP_benchmark (probe.seed)")
    parser.add_argument("--batch-size", type=int, default=CheckConfig.batch_size,
                        help="CLIP_benchmark's --batch_size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=CheckConfig.workers,
                        help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=CheckConfig.lr,
                        help="CLIP_benchmark's --fewshot_lr (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=CheckConfig.epochs,
                        help="CLIP_benchmark's --fewshot_epochs (default: %(default)s)")
    parser.add_argument("--fewshot-k", type=int, default=CheckConfig.fewshot_k,
                        help="CLIP_benchmark's --fewshot_k, -1: every train image (default: %(default)s)")
    parser.add_argument("--json", default=str(STUDY),
                        help="study file the records go to, its page re-rendered; empty: none (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log CLIP_benchmark's training lines too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    changes = {key: value for key, value in (
        ("shards", args.shards), ("student", args.student), ("cache", args.cache), ("out", args.probe_metrics),
        ("seed", args.seed),
        ("teacher.config", args.teacher_config), ("teacher.checkpoint", args.teacher_checkpoint),
        ("teacher.model", args.teacher_model), ("teacher.pretrained", args.teacher_pretrained)) if value is not None}
    try:
        probe_config = override(load_config("probe", args.params), changes)
        config = CheckConfig(
            probe_config, args.out,
            probe_config.max_train_images if args.train_images is None else args.train_images,
            probe_config.holdout_fraction if args.holdout_fraction is None else args.holdout_fraction,
            args.batch_size, args.workers, args.lr, args.epochs, args.fewshot_k)
        metrics_path = Path(probe_config.out)
        if not metrics_path.is_file():
            raise PipelineError(f"{metrics_path}: no probe metrics to compare with; run `python -m pipeline probe`")
        probe = probe_figures(json.loads(metrics_path.read_text()))
        figures = run(config)
        print_table(figures, probe)
        if args.json:
            results.update_study(Path(args.json), records(config, figures, probe), skeleton(Path(args.json), config))
            print(f"wrote {args.json} and its page {Path(args.json).with_suffix('.md')}")
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
