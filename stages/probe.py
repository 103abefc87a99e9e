"""`python -m pipeline probe`: what the student learned, measured the way the literature does.

Frozen features of the train and val shards (the whole image, resized to each model's
resolution) for the teacher (image embeddings), the distilled student (pooled backbone
features, before the head), a random-init student of the same architecture and seed (the
floor) and the supervised reference (the ceiling). Linear probe: multinomial logistic
regression on standardised features, regularisation chosen on a held-out share of train,
refit on all of train, top-1/top-5 on val; for the student also on its projected embedding
(`linear_top1_embedding`). Zero-shot on val against the cache's anchors: the teacher's image
embedding and the student's projected embedding; and the teacher against plain and CPA
class anchors (`zeroshot_top1_plain`, `zeroshot_top1_cpa`), whatever prompt set the cache holds.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.cache import TeacherCache
from pipeline.config import ProbeConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.features import extract_features, zero_shot_scores
from pipeline.linear_probe import linear_probe, topk_accuracy
from pipeline.prompts import class_anchors
from pipeline.shards import list_shards, manifest_rows, read_classes
from pipeline.student import Student, build_student, load_student
from pipeline.teacher import load_teacher, require_same_teacher, resolve_device
from pipeline.training import write_json

log = logging.getLogger(__name__)

ROWS = ("teacher", "student", "random_init", "supervised")


def backbone_encoder(model: Student, device: torch.device):
    model = model.to(device).eval()

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return model.features(pixels.to(device)).float().cpu()

    return encode


def embedding_encoder(model: Student, device: torch.device):
    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels.to(device)).float().cpu()

    return encode


def random_init_like(checkpoint: dict[str, Any]) -> Student:
    """The distilled student's architecture, initialised as distill initialised it (same seed)."""
    torch.manual_seed(int(checkpoint["params"]["train"]["seed"]))
    return build_student(checkpoint["model"])


def run(config: ProbeConfig) -> dict[str, Any]:
    device = resolve_device(config.device)
    cache = TeacherCache(config.cache)
    student, checkpoint = load_student(config.student)
    if checkpoint.get("anchor_digest") != cache.header.prompt_digest:
        raise PipelineError(f"{config.student}: trained against other anchors than {config.cache}")
    teacher = load_teacher(config.teacher, config.device)
    require_same_teacher(config.cache, cache.header.teacher_identity, teacher.identity,
                         "re-run precompute or fix the teacher options")
    classes = read_classes(config.shards)
    size = int(checkpoint["image_size"])
    backbones = {"student": student, "random_init": random_init_like(checkpoint)}
    if config.supervised:
        supervised, _ = load_student(config.supervised)
        backbones["supervised"] = supervised
    encoders = {name: (size, backbone_encoder(model, device)) for name, model in backbones.items()}
    encoders["teacher"] = (teacher.image_size, teacher.encode_image)
    train_shards = list_shards(config.shards, "train")
    if config.max_train_images:
        train_shards = first_shards_with(train_shards, config.max_train_images, config.shards)
    encoders["student_embedding"] = (size, embedding_encoder(student, device))
    train_features, train_labels, _ = extract_features(train_shards, encoders, config.batch_size,
                                                       config.workers, "probe train")
    val_features, val_labels, _ = extract_features(list_shards(config.shards, "val"), encoders,
                                                   config.batch_size, config.workers, "probe val")
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise PipelineError(f"{config.shards}: the probe needs labelled train and val shards")

    num_classes = len(classes)
    metrics: dict[str, dict[str, float]] = {}
    for name in (*ROWS, "student_embedding"):
        if name not in train_features:
            continue
        result = linear_probe(train_features[name], train_labels, val_features[name], val_labels,
                              num_classes, holdout_fraction=config.holdout_fraction, seed=config.seed)
        if name == "student_embedding":  # the projected embedding, beside the pooled features
            metrics["student"].update(linear_top1_embedding=result.top1, linear_top5_embedding=result.top5)
        else:
            metrics[name] = {"linear_top1": result.top1, "linear_top5": result.top5}
        log.info("%s: linear top-1 %.3f (weight decay %.1e)", name, result.top1, result.weight_decay)
    anchors, anchor_classes = cache.anchors(), cache.anchor_classes()
    for name, features in (("teacher", val_features["teacher"]),
                           ("student", val_features["student_embedding"])):
        scores = zero_shot_scores(features, anchors, anchor_classes, num_classes)
        metrics[name]["zeroshot_top1"] = topk_accuracy(scores, val_labels, 1)
        metrics[name]["zeroshot_top5"] = topk_accuracy(scores, val_labels, min(5, num_classes))
    for prompt_set in ("plain", "cpa"):  # the teacher with either prompt set, whatever the cache holds
        set_anchors = class_anchors(teacher.encode_text, classes, config.prompts, prompt_set)
        scores = zero_shot_scores(val_features["teacher"], set_anchors, torch.arange(num_classes),
                                  num_classes)
        metrics["teacher"][f"zeroshot_top1_{prompt_set}"] = topk_accuracy(scores, val_labels, 1)
    write_json(config.out, metrics)
    write_resolved(config, Path(config.out).with_suffix(".config.json"))
    plots = Path(config.plots)
    plot_bars(metrics, plots / "probe.png")
    if Path(config.distill_csv).is_file():
        plot_curves(Path(config.distill_csv), plots / "distill.png")
    print_table(metrics)
    return metrics


def first_shards_with(shards: list[Path], images: int, shard_dir: str) -> list[Path]:
    """The leading shards holding at least `images` samples (per the manifest)."""
    counts = {name: row["samples"] for name, row in manifest_rows(Path(shard_dir)).items()}
    chosen, total = [], 0
    for shard in shards:
        chosen.append(shard)
        total += counts.get(shard.name, images)
        if total >= images:
            break
    return chosen


def read_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no probe metrics yet; run `python -m pipeline probe`")
    return json.loads(path.read_text())


def print_table(metrics: dict[str, dict[str, float]]) -> None:
    """The probe table: one row per model, fractions as percentages."""

    def cell(row: dict[str, float], key: str) -> str:
        return f"{100 * row[key]:6.1f}" if key in row else "     -"

    print()
    print(f"{'model':<13} {'linear top-1':>12} {'linear top-5':>12} {'zero-shot top-1':>15} "
          f"{'zero-shot top-5':>15}")
    for name in ROWS:
        if name in metrics:
            row = metrics[name]
            print(f"{name:<13} {cell(row, 'linear_top1'):>12} {cell(row, 'linear_top5'):>12} "
                  f"{cell(row, 'zeroshot_top1'):>15} {cell(row, 'zeroshot_top5'):>15}")
    if "teacher" in metrics and "student" in metrics:
        t, s = metrics["teacher"], metrics["student"]
        ratio = s["zeroshot_top1"] / t["zeroshot_top1"] if t["zeroshot_top1"] else float("nan")
        print(f"student - teacher linear top-1: {100 * (s['linear_top1'] - t['linear_top1']):+.1f} points; "
              f"student / teacher zero-shot top-1: {ratio:.2f}")
    print()


def plot_bars(metrics: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [n for n in ROWS if n in metrics]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, key, label in ((-width / 2, "linear_top1", "linear probe top-1"),
                               (width / 2, "zeroshot_top1", "zero-shot top-1")):
        values = [metrics[n].get(key, 0.0) for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label)
        for bar, name in zip(bars, names, strict=True):
            if key in metrics[name]:
                ax.annotate(f"{100 * bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2,
                                                              bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("val accuracy")
    ax.set_title("probe: teacher, distilled student, baselines")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(csv_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [float(r["loss"]) for r in rows], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("CSM loss (KL)")
    right.plot(epochs, [float(r["agreement"]) for r in rows], marker="o", color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("teacher agreement top-1")
    fig.suptitle("distill")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
