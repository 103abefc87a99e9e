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

Memory is bounded for ImageNet: the images are decoded once and every model's features are
stored in float16 on the host; the models are then freed and the probes are fitted one model at
a time on the stage's device, each moving only its own features there (as float32). The
budget (`pipeline.linear_probe.probe_memory`) is logged before the features are extracted, and
the shared memory of the DataLoader workers' batches is checked against /dev/shm.

It runs in one process: under torchrun, rank 0 does it all on its own device and the other
ranks return at once (every rank would otherwise run the whole probe, on the same GPU).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import confusion, distributed, retrieval
from pipeline.atomic import atomic_path, write_json
from pipeline.cache import TeacherCache
from pipeline.config import ProbeConfig, PromptsConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.features import check_loader_memory, extract_features, zero_shot_scores
from pipeline.linear_probe import DEFAULT_WEIGHT_DECAYS, linear_probe, probe_memory, topk_accuracy
from pipeline.precision import configure, for_device
from pipeline.progress import Progress
from pipeline.prompts import class_anchors, encode_prompts, prompt_store
from pipeline.shards import ClassInfo, list_shards, manifest_rows, read_classes, sample_count
from pipeline.student import Student, build_student, load_student, student_input, student_on
from pipeline.teacher import autocast, load_teacher, resolve_device

log = logging.getLogger(__name__)

ROWS = ("teacher", "student", "random_init", "supervised")
FEATURE_DTYPE = torch.float16  # stored features: half of float32; the fits convert to float32
ZERO_SHOT_ROWS = 4096  # val rows scored at a time (the scores are rows x classes)


def backbone_encoder(model: Student, device: torch.device, precision: str = "fp32"):
    """A model's pooled-feature encoder (float32 out; under bf16 autocast with `precision` bf16)."""
    model = student_on(model, device).eval()

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model.features(student_input(pixels, device)).float()

    return encode


def backbone_and_embedding_encoders(model: Student, device: torch.device, precision: str = "fp32"):
    """A model's pooled-feature encoder and embedding encoder, sharing its backbone pass: the
    embedding encoder, called on the very batch the feature encoder just saw, only runs the head
    (on another batch, the whole model)."""
    backbone = backbone_encoder(model, device, precision)  # moves the model
    last: dict[str, torch.Tensor] = {}

    def features(pixels: torch.Tensor) -> torch.Tensor:
        last["pixels"], last["features"] = pixels, backbone(pixels)
        return last["features"]

    @torch.no_grad()
    def embeddings(pixels: torch.Tensor) -> torch.Tensor:  # the head in float32: it costs little
        shared = last.get("pixels") is pixels
        return model.embed(last.pop("features") if shared else backbone(pixels))

    return features, embeddings


def parse_baselines(text: str) -> dict[str, str]:
    """`--baselines simclr=a.pt,byol=b.pt` as {name: checkpoint}; a malformed or clashing entry is an error."""
    baselines: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not name or not path or name in (*ROWS, "student_embedding") or name in baselines:
            raise PipelineError(f"option --baselines: '{entry}' is not NAME=CHECKPOINT with a new name "
                                f"(not one of {', '.join(ROWS)}); e.g. --baselines simclr=data/models/simclr.pt")
        baselines[name] = path
    return baselines


def random_init_like(checkpoint: dict[str, Any]) -> Student:
    """The distilled student's architecture, initialised as distill initialised it (same seed)."""
    torch.manual_seed(int(checkpoint["params"]["train"]["seed"]))
    return build_student(checkpoint["model"])


def run(config: ProbeConfig) -> dict[str, Any]:
    """The probe; under torchrun on rank 0 only (the other ranks return an empty dict)."""
    process = distributed.single_process_stage("probe")
    if process is None:
        return {}
    device = distributed.local_device(resolve_device(config.device), process)
    # TF32 on or off as --precision says: PyTorch's default leaves cuDNN convolutions on TF32
    configure(for_device(config.precision, device))
    cache = TeacherCache(config.cache)
    classes = read_classes(config.shards)
    num_classes = len(classes)
    train, val, shifted, zero_shot = features_and_zero_shot(config, cache, classes, device)
    if device.type == "cuda":  # the models are gone: give their memory to the fits
        torch.cuda.empty_cache()

    metrics: dict[str, dict[str, float]] = {}
    names = [name for name in (*ROWS, *parse_baselines(config.baselines), "student_embedding")
             if name in train.features]
    progress = Progress(len(names) * (len(DEFAULT_WEIGHT_DECAYS) + 1), "probe fits", "fit")
    for name in names:  # one model at a time; its features are freed after its fit
        progress.set_postfix(model=name)
        also = {"shifted": (shifted.features.pop(name), shifted.labels)} if shifted is not None else None
        result = linear_probe(train.features.pop(name), train.labels, val.features.pop(name), val.labels,
                              num_classes, holdout_fraction=config.holdout_fraction, seed=config.seed,
                              device=device, progress=progress, also=also)
        if name == "student_embedding":  # the projected embedding, beside the pooled features
            metrics["student"].update(linear_top1_embedding=result.top1, linear_top5_embedding=result.top5)
        else:
            metrics[name] = {"linear_top1": result.top1, "linear_top5": result.top5}
            if shifted is not None:
                metrics[name]["shifted_linear_top1"] = result.also_top1["shifted"]
        log.info("%s: linear top-1 %.3f (weight decay %.1e)", name, result.top1, result.weight_decay)
    progress.close()
    for name, row in zero_shot.items():
        metrics[name].update(row)
    write_json(config.out, metrics)
    write_resolved(config, Path(config.out).with_suffix(".config.json"))
    plots = Path(config.plots)
    plot_bars(metrics, plots / "probe.png")
    if Path(config.distill_csv).is_file():
        plot_curves(Path(config.distill_csv), plots / "distill.png")
    print_table(metrics)
    return metrics


@dataclass
class SplitFeatures:
    """One split's frozen features, per model (N, D) FEATURE_DTYPE on the host, and its labels (N,)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor


def shard_split(directory: str, split: str) -> list[Path]:
    """An optional split's shards (the demo's `shifted`): none when the directory has none."""
    return sorted(Path(directory).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def features_and_zero_shot(config: ProbeConfig, cache: TeacherCache, classes: list[ClassInfo],
                           device: torch.device) -> tuple[SplitFeatures, SplitFeatures, SplitFeatures | None,
                                                          dict[str, dict[str, float]]]:
    """Every model's train, val and (when the shards have it) shifted features, one pass over the
    images, and the zero-shot and retrieval metrics.

    The models live only in here, so their memory is free for the fits once it returns. Logs the
    memory budget of the probe first.
    """
    student, checkpoint = load_student(config.student)
    cache.require_student(config.student, checkpoint, fix="pass the student distilled from this cache (--student)")
    teacher = load_teacher(config.teacher, str(device), precision=config.precision)
    cache.require(teacher_identity=teacher.identity, fix="re-run precompute or fix the teacher options")
    size = int(checkpoint["image_size"])
    backbones = {"student": student, "random_init": random_init_like(checkpoint)}
    if config.supervised:
        backbones["supervised"] = load_student(config.supervised)[0]
    sizes = dict.fromkeys(backbones, size)
    for name, path in parse_baselines(config.baselines).items():  # e.g. the SSL baselines, each at its resolution
        backbones[name], baseline = load_student(path)
        sizes[name] = int(baseline["image_size"])
    student_features, student_embeddings = backbone_and_embedding_encoders(student, device, config.precision)
    # the student first: its embedding row (last) reuses this backbone pass
    encoders = {"student": (size, student_features)}
    encoders.update({name: (sizes[name], backbone_encoder(model, device, config.precision))
                     for name, model in backbones.items() if name != "student"})
    encoders["teacher"] = (teacher.image_size, teacher.encode_image)
    encoders["student_embedding"] = (size, student_embeddings)
    dims = {"teacher": teacher.embed_dim, **{name: model.feature_dim for name, model in backbones.items()},
            "student_embedding": int(checkpoint["model"]["out_dim"])}
    train_shards = list_shards(config.shards, "train")
    if config.max_train_images:
        train_shards = first_shards_with(train_shards, config.max_train_images, config.shards)
    val_shards = list_shards(config.shards, "val")
    num_classes = len(classes)

    def log_budget(num_train: int, num_val: int) -> None:
        log.info("%s", probe_memory(num_train, num_val, dims, num_classes, device=device,
                                    store_dtype=FEATURE_DTYPE).describe())

    num_train, num_val = sample_count(train_shards), sample_count(val_shards)
    if num_train is not None and num_val is not None:
        log_budget(num_train, num_val)
    # One loader at a time (train, then val): the split with more shards can run more workers.
    # One process per machine runs loaders (the other torchrun ranks have returned).
    check_loader_memory("probe", f"--workers {config.workers} --batch-size {config.batch_size}",
                        max(train_shards, val_shards, key=len), [size for size, _ in encoders.values()],
                        config.batch_size, config.workers)
    pinned = device.type == "cuda"  # the encoders copy each batch to the GPU: from pinned memory, asynchronously
    train = SplitFeatures(*extract_features(train_shards, encoders, config.batch_size, config.workers,
                                            "probe train", FEATURE_DTYPE, pin_memory=pinned)[:2])
    captions: list[str | None] = []
    val = SplitFeatures(*extract_features(val_shards, encoders, config.batch_size, config.workers,
                                          "probe val", FEATURE_DTYPE, pin_memory=pinned, captions=captions)[:2])
    shifted = None
    if shifted_shards := shard_split(config.shards, "shifted"):  # the demo's distribution-shift split
        shifted = SplitFeatures(*extract_features(shifted_shards, encoders, config.batch_size, config.workers,
                                                  "probe shifted", FEATURE_DTYPE, pin_memory=pinned)[:2])
    if (train.labels < 0).any() or (val.labels < 0).any() or (shifted is not None and (shifted.labels < 0).any()):
        raise PipelineError(f"{config.shards}: the probe needs labelled train and val shards")
    if num_train is None or num_val is None:  # no manifest: the budget from what was extracted
        log_budget(len(train.labels), len(val.labels))

    zero_shot: dict[str, dict[str, float]] = {}
    anchors, anchor_classes = cache.anchors(), cache.anchor_classes()
    related = confusion.related_classes(config.shards)
    confusions = {}
    for name, embedding in (("teacher", "teacher"), ("student", "student_embedding")):
        features = val.features[embedding]
        top1, top5, predicted = zero_shot_accuracy(features, val.labels, anchors, anchor_classes, num_classes)
        zero_shot[name] = {"zeroshot_top1": top1, "zeroshot_top5": top5}
        if shifted is not None:
            zero_shot[name]["shifted_zeroshot_top1"] = zero_shot_accuracy(
                shifted.features[embedding], shifted.labels, anchors, anchor_classes, num_classes)[0]
        confusions[name] = confusion.summarize(confusion.confusion_matrix(predicted, val.labels, num_classes),
                                               confusion.display_names(classes), related)
        log.info("%s", confusion.describe(f"{name} zero-shot", confusions[name]))
        if related is not None:
            zero_shot[name]["zeroshot_errors_related"] = confusions[name]["related_share"]
    write_json(Path(config.plots) / "confusion.json", {
        "what": "zero-shot errors on the val split, per model (pipeline/confusion.py)",
        "related": "twin classes of the hard demo world" if related is not None else None,
        "models": confusions})
    for prompt_set in ("plain", "cpa"):  # the teacher with either prompt set, whatever the cache holds
        def encode(texts: list[str], what: str = f"teacher {prompt_set} prompts") -> torch.Tensor:
            return encode_prompts(teacher, texts, prompt_store(config.cache), what)  # on the CPU

        set_anchors = class_anchors(encode, classes, config.prompts, prompt_set)
        top1, _, _ = zero_shot_accuracy(val.features["teacher"], val.labels, set_anchors,
                                     torch.arange(num_classes), num_classes)
        zero_shot["teacher"][f"zeroshot_top1_{prompt_set}"] = top1
    if captions and all(caption is not None for caption in captions):  # retrieval on the val captions
        recalls = caption_retrieval(teacher, {"teacher": val.features["teacher"],
                                              "student": val.features["student_embedding"]},
                                    captions, prompt_store(config.cache))
        for name, recall in recalls.items():
            zero_shot[name].update(recall)
        log.info("retrieval on %d val images and their %d distinct captions: teacher image->text R@1 %.3f, "
                 "student %.3f", len(captions), len(set(captions)), zero_shot["teacher"]["retrieval_image_to_text_r1"],
                 zero_shot["student"]["retrieval_image_to_text_r1"])
    return train, val, shifted, zero_shot


def caption_retrieval(teacher, image_embeddings: dict[str, torch.Tensor], captions: list[str],
                      store: Path | None) -> dict[str, dict[str, float]]:
    """Per model, image-to-text and text-to-image recall@1/5 of its image embeddings against the
    teacher's embeddings of the distinct captions (`retrieval_*` keys); the captions are encoded once."""
    texts, text_of_image = retrieval.distinct(captions)
    text_embeddings = encode_prompts(teacher, texts, store, "val captions")
    return {name: {f"retrieval_{key}": value
                   for key, value in retrieval.recall_at_k(images, text_embeddings, text_of_image).items()}
            for name, images in image_embeddings.items()}


def measure_teacher(teacher, shards: str, prompts: PromptsConfig, device: torch.device, *,
                    batch_size: int = 256, workers: int = 0, holdout_fraction: float = 0.1,
                    seed: int = 0) -> dict[str, float]:
    """A teacher on its own (no cache, no student): what the probe measures of the teacher.

    Linear probe of its image embeddings (fitted on train; top-1 on val and on the shifted split
    when the shards have one); zero-shot top-1 on val with CPA class anchors (`zeroshot_top1`,
    the prompt set the demo's caches hold), plain ones (`zeroshot_top1_plain`) and CPA on the
    shifted split; image-text retrieval on the val captions. Used to compare teacher pre-training
    (scripts/ablation.py --teacher-only).
    """
    classes = read_classes(shards)
    num_classes = len(classes)
    encoders = {"teacher": (teacher.image_size, teacher.encode_image)}
    splits, captions = {}, []
    for split, split_shards in (("train", list_shards(shards, "train")), ("val", list_shards(shards, "val")),
                                ("shifted", shard_split(shards, "shifted"))):
        if split_shards:
            features, labels, _ = extract_features(split_shards, encoders, batch_size, workers,
                                                   f"teacher {split}", FEATURE_DTYPE,
                                                   captions=captions if split == "val" else None)
            splits[split] = SplitFeatures(features, labels)
    train, val, shifted = splits["train"], splits["val"], splits.get("shifted")
    also = {"shifted": (shifted.features["teacher"], shifted.labels)} if shifted is not None else None
    result = linear_probe(train.features["teacher"], train.labels, val.features["teacher"], val.labels, num_classes,
                          holdout_fraction=holdout_fraction, seed=seed, device=device, also=also)
    metrics = {"linear_top1": result.top1, "linear_top5": result.top5}
    if shifted is not None:
        metrics["shifted_linear_top1"] = result.also_top1["shifted"]
    for prompt_set, key in (("cpa", "zeroshot_top1"), ("plain", "zeroshot_top1_plain")):
        anchors = class_anchors(teacher.encode_text, classes, prompts, prompt_set)
        metrics[key] = zero_shot_accuracy(val.features["teacher"], val.labels, anchors, torch.arange(num_classes),
                                          num_classes)[0]
        if shifted is not None and prompt_set == "cpa":
            metrics["shifted_zeroshot_top1"] = zero_shot_accuracy(
                shifted.features["teacher"], shifted.labels, anchors, torch.arange(num_classes), num_classes)[0]
    if captions and all(caption is not None for caption in captions):
        metrics.update(caption_retrieval(teacher, {"teacher": val.features["teacher"]}, captions, None)["teacher"])
    return metrics


def zero_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                       anchor_classes: torch.Tensor, num_classes: int) -> tuple[float, float, torch.Tensor]:
    """Zero-shot top-1, top-k (k = min(5, classes)) and the predicted classes, scored
    ZERO_SHOT_ROWS rows at a time."""
    k = min(5, num_classes)
    hits = [0, 0]
    predicted = []
    for start in range(0, len(labels), ZERO_SHOT_ROWS):
        rows = slice(start, start + ZERO_SHOT_ROWS)
        scores = zero_shot_scores(features[rows], anchors, anchor_classes, num_classes)
        for i, top in enumerate((1, k)):  # a fraction of at most ZERO_SHOT_ROWS rows: exact count
            hits[i] += round(topk_accuracy(scores, labels[rows], top) * scores.shape[0])
        predicted.append(scores.argmax(dim=-1).cpu())
    return hits[0] / len(labels), hits[1] / len(labels), torch.cat(predicted)


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
    for name in table_rows(metrics):
        row = metrics[name]
        print(f"{name:<13} {cell(row, 'linear_top1'):>12} {cell(row, 'linear_top5'):>12} "
              f"{cell(row, 'zeroshot_top1'):>15} {cell(row, 'zeroshot_top5'):>15}")
    if "teacher" in metrics and "student" in metrics:
        t, s = metrics["teacher"], metrics["student"]
        ratio = s["zeroshot_top1"] / t["zeroshot_top1"] if t["zeroshot_top1"] else float("nan")
        print(f"student - teacher linear top-1: {100 * (s['linear_top1'] - t['linear_top1']):+.1f} points; "
              f"student / teacher zero-shot top-1: {ratio:.2f}")
    print()


def table_rows(metrics: dict[str, dict[str, float]]) -> list[str]:
    """The models of a probe's metrics in table order: ROWS, then the baselines as given."""
    return [name for name in ROWS if name in metrics] + [name for name in metrics if name not in ROWS]


def plot_bars(metrics: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = table_rows(metrics)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
