"""`python -m pipeline predict IMAGE_OR_FOLDER...`: the student's top-5 classes for image files.

Each image is read whole and given the evaluation view (`pipeline.views.eval_view`, the view
the probe uses: shorter side resized to the student's resolution, centre crop). Class
probabilities are softmax(score / tau_student) over the classes, where a class's score is the
best cosine between the student embedding and that class's anchors in the cache (in `class`
anchor mode, one anchor per class, so this is exactly the distillation's p_S; in `prompt` mode,
the max over the class's prompts). tau_student is the one the student was distilled with.
Class names come from the classes.json of the shards the cache was made from. `--teacher`
adds the teacher's top-5 (its own resolution, tau_teacher) for comparison.

`load_classifier` is shared with `export`: both refuse a checkpoint that does not embed into
the cache's anchor space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError

from pipeline.atomic import write_json
from pipeline.cache import TeacherCache
from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.features import zero_shot_scores
from pipeline.shards import ClassInfo, decode_rgb, read_classes
from pipeline.student import Student, load_student
from pipeline.teacher import load_teacher, resolve_device, teacher_identity
from pipeline.views import eval_view
from stages.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

BATCH_SIZE = 64  # images decoded and embedded together; output streams batch by batch


@dataclass(frozen=True)
class PredictConfig:
    inputs: tuple[Path, ...]  # image files and folders (searched recursively)
    student: Path
    cache: Path
    shards: Path  # the shard directory whose classes.json names the cache's classes
    tau_student: float  # used when the checkpoint does not record its own
    tau_teacher: float
    teacher: TeacherConfig | None = None  # None: student only
    device: str = "auto"
    json: Path | None = None
    top: int = 5


@dataclass
class AnchorClassifier:
    """A distilled student with the cache's anchors: what `predict` runs and `export` writes."""

    model: Student
    checkpoint: dict[str, Any]
    anchors: torch.Tensor  # (K, D) float32, unit norm
    anchor_classes: torch.Tensor  # (K,) int64 class index of each anchor
    classes: list[ClassInfo]
    tau: float
    cache: TeacherCache

    @property
    def image_size(self) -> int:
        return int(self.checkpoint["image_size"])

    @property
    def labels(self) -> list[str]:
        return class_labels(self.classes)


def class_labels(classes: Sequence[ClassInfo]) -> list[str]:
    """Display names; a name shared by several classes (a homonym) gets its first CPA context
    (or its id) in parentheses, so 'crane (bird)' and 'crane (machine)' stay apart."""
    counts: dict[str, int] = {}
    for c in classes:
        counts[c.name] = counts.get(c.name, 0) + 1
    return [c.name if counts[c.name] == 1 else f"{c.name} ({c.contexts[0] if c.contexts else c.id})"
            for c in classes]


def class_probabilities(embeddings: torch.Tensor, anchors: torch.Tensor, anchor_classes: torch.Tensor,
                        num_classes: int, tau: float) -> torch.Tensor:
    """(N, C) softmax over classes of (best cosine to the class's anchors) / tau."""
    return torch.softmax(zero_shot_scores(embeddings, anchors, anchor_classes, num_classes) / tau, dim=-1)


def check_classes(classes: list[ClassInfo], cache: TeacherCache, shards: Path) -> None:
    """The classes.json must be the one the cache's prompts were built from."""
    where = f"{shards}/classes.json"
    fix = "pass --shards with the shard directory the cache was made from"
    if len(classes) != cache.header.num_classes:
        raise PipelineError(f"{where}: {len(classes)} classes, but {cache.path} has "
                            f"{cache.header.num_classes}; {fix}")
    prompts = "\n".join(cache.prompts())  # every prompt is a template filled with its class's name
    missing = [c for c in classes if c.name not in prompts]
    if missing:
        raise PipelineError(f"{where}: class '{missing[0].name}' (index {missing[0].index}) appears in "
                            f"none of {cache.path}'s prompts; {fix}")


def load_classifier(student: Path, cache_path: Path, shards: Path, tau_student: float) -> AnchorClassifier:
    """The student, the anchors it was distilled against, the class names and its temperature."""
    cache = TeacherCache(cache_path)
    model, checkpoint = load_student(student)
    spec = checkpoint["model"]
    if not spec.get("normalize_output") or spec.get("out_dim") != cache.header.embed_dim:
        raise PipelineError(f"{student}: not a distilled student embedding into {cache_path}'s "
                            f"{cache.header.embed_dim}-d anchor space (a supervised reference?); "
                            f"pass --student with a checkpoint written by distill")
    if checkpoint.get("anchor_digest") != cache.header.prompt_digest:
        raise PipelineError(f"{student}: trained against other anchors than {cache_path}; "
                            f"pass --cache with the cache the student was distilled from")
    classes = read_classes(shards)
    check_classes(classes, cache, shards)
    tau = float(checkpoint.get("params", {}).get("tau_student", tau_student))
    anchors, anchor_classes = cache.anchors().float(), cache.anchor_classes()
    cache.close()  # the header is all that is asked of it from here on
    return AnchorClassifier(model, checkpoint, anchors, anchor_classes, classes, tau, cache)


def image_files(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to every image file below them, sorted."""
    files: list[Path] = []
    missing: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()
                                and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.exists():
            files.append(path)  # whatever its name: an unreadable file is reported when it is read
        else:
            missing.append(path)
    if not files:
        what = "no such file or folder" if missing == list(inputs) else (
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        raise PipelineError(f"{' '.join(map(str, inputs)) or 'IMAGE_OR_FOLDER'}: {what}; "
                            f"give image files or folders holding them")
    for path in missing:
        log.warning("%s: no such file or folder; skipped", path)
    return files


def read_images(files: Sequence[Path]) -> Iterator[tuple[Path, torch.Tensor | None, str]]:
    """(file, (3, H, W) uint8 image or None, why it could not be read)."""
    for path in files:
        try:
            yield path, decode_rgb(path.read_bytes()), ""
        except UnidentifiedImageError:
            yield path, None, "unknown image format or corrupt data"
        except Exception as err:  # any decoder or file failure: report the file, go on
            yield path, None, (str(err).splitlines() or [type(err).__name__])[0]


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def top_classes(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per image, the k most probable classes: index, label and probability, best first."""
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=-1)
    return [[{"class": c, "name": labels[c], "probability": p} for p, c in zip(row_p, row_c, strict=True)]
            for row_p, row_c in zip(values.tolist(), indices.tolist(), strict=True)]


@dataclass(frozen=True)
class Encoder:
    """An image model as predict uses it: its resolution, [0, 1] or uint8 pixels -> embeddings, its tau."""

    image_size: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    tau: float


def student_encoder(classifier: AnchorClassifier, device_name: str) -> Encoder:
    device = resolve_device(device_name)
    model = classifier.model.to(device)
    return Encoder(classifier.image_size, lambda pixels: model(pixels.to(device)).float().cpu(), classifier.tau)


def teacher_encoder(classifier: AnchorClassifier, config: PredictConfig) -> Encoder:
    """The params' teacher, refused (before it is built) unless it is the one the cache records."""
    assert config.teacher is not None
    classifier.cache.require(teacher_identity=teacher_identity(config.teacher),
                             fix="fix the teacher section of the params file or drop --teacher")
    teacher = load_teacher(config.teacher, config.device)
    tau = float(classifier.checkpoint.get("params", {}).get("tau_teacher", config.tau_teacher))
    return Encoder(teacher.image_size, lambda pixels: teacher.encode_image(pixels).cpu(), tau)


def predict_batch(batch: list[tuple[Path, torch.Tensor | None, str]], encoders: dict[str, Encoder],
                  classifier: AnchorClassifier, top: int) -> list[dict[str, Any]]:
    """Print and return the predictions of one batch of read images, in order."""
    readable = [image for _, image, _ in batch if image is not None]
    tops: dict[str, list[list[dict[str, Any]]]] = {}
    if readable:
        for name, encoder in encoders.items():
            pixels = torch.stack([eval_view(image, encoder.image_size) for image in readable])
            with torch.no_grad():
                embeddings = encoder.encode(pixels)
            probabilities = class_probabilities(embeddings, classifier.anchors, classifier.anchor_classes,
                                                len(classifier.classes), encoder.tau)
            tops[name] = top_classes(probabilities, classifier.labels, top)
    predictions, row = [], 0
    for path, image, error in batch:
        if image is None:
            log.warning("%s: not readable as an image (%s); skipped", path, error)
            predictions.append({"file": str(path), "error": error})
            continue
        prediction = {"file": str(path), **{name: rows[row] for name, rows in tops.items()}}
        row += 1
        print_prediction(prediction, list(encoders))
        predictions.append(prediction)
    return predictions


def run(config: PredictConfig) -> list[dict[str, Any]]:
    """Print and return the top classes of every image (`{"file", "student", "teacher"?}` or
    `{"file", "error"}` for an unreadable one); write them to `config.json` if set."""
    if config.top < 1:
        raise PipelineError(f"option --top {config.top}: must be at least 1")
    files = image_files(config.inputs)
    classifier = load_classifier(config.student, config.cache, config.shards, config.tau_student)
    encoders = {"student": student_encoder(classifier, config.device)}
    if config.teacher is not None:
        encoders["teacher"] = teacher_encoder(classifier, config)
    log.info("%s at %dpx, %d anchors over %d classes, tau %g", config.student, classifier.image_size,
             classifier.anchors.shape[0], len(classifier.classes), classifier.tau)
    predictions: list[dict[str, Any]] = []
    for batch in chunks(read_images(files), BATCH_SIZE):
        predictions.extend(predict_batch(batch, encoders, classifier, config.top))
    if all("error" in p for p in predictions):
        raise PipelineError(f"{' '.join(map(str, config.inputs))}: none of the {len(files)} file(s) could be "
                            f"read as an image; give JPEG, PNG or other image files")
    if config.json is not None:
        write_json(config.json, {"student": str(config.student), "cache": str(config.cache),
                                 "tau_student": classifier.tau, "image_size": classifier.image_size,
                                 "predictions": predictions})
    return predictions


def print_prediction(prediction: dict[str, Any], models: Sequence[str]) -> None:
    print(prediction["file"])
    for name in models:
        print(f"  {name:<8} " + " | ".join(f"{c['probability']:.3f} {c['name']}" for c in prediction[name]))
