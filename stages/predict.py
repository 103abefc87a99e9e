"""`python -m pipeline predict IMAGE_OR_FOLDER...`: the student's top-5 classes for image files.

Each image is read whole and given the evaluation view (`pipeline.views.eval_view`, the view
the probe uses: shorter side resized to the student's resolution, centre crop). Class
probabilities are softmax(score / tau_student) over the classes, where a class's score is the
best cosine between the student embedding and that class's anchors in the cache (in `class`
anchor mode, one anchor per class, so this is exactly the distillation's p_S; in `prompt` mode,
the max over the class's prompts). tau_student is the one the student was distilled with.
Class names come from the classes.json of the shards the cache was made from. `--teacher`
adds the teacher's top-5 (its own resolution, tau_teacher) for comparison.

Where the files come from (`StudentFiles`, `open_classifier`): the student is `--student`, else
the params' `probe.student`; the cache and the shards are `--cache`/`--shards`, else what the
student's checkpoint records (`params.train.cache`/`.shards`, the run that made it) where that
exists here, else the params' `probe` section. One info line says which files are used and
where each came from. `open_classifier` is shared with `export`: both refuse a checkpoint that
does not embed into the cache's anchor space, and a teacher the cache was not made by.
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
from pipeline.config import DEFAULT_PARAMS, TeacherConfig, load_config, to_dict
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
class StudentFiles:
    """The student, its cache and its shards as the command line names them (None: not given), and
    the params file whose probe section is the last resort (see `open_classifier`)."""

    student: Path | None = None
    cache: Path | None = None
    shards: Path | None = None  # the shard directory whose classes.json names the cache's classes
    params: Path = DEFAULT_PARAMS


@dataclass(frozen=True)
class Source:
    """A path and where it came from: an option, the student's checkpoint or the params."""

    path: Path
    origin: str

    def __str__(self) -> str:
        return f"{self.path} (from {self.origin})"


@dataclass(frozen=True)
class PredictConfig:
    inputs: tuple[Path, ...]  # image files and folders (searched recursively)
    files: StudentFiles
    tau_student: float  # used when the checkpoint does not record its own
    tau_teacher: float
    teacher: TeacherConfig | None = None  # checked against the cache before anything runs; None: no check
    show_teacher: bool = False  # also the teacher's top classes (`teacher` is the one run)
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
    student: Path

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


def anchor_classifier(model: Student, checkpoint: dict[str, Any], student: Path, cache_path: Path, shards: Path,
                      tau_student: float) -> AnchorClassifier:
    """A loaded student with the anchors it was distilled against, the class names and its temperature,
    once they fit together."""
    cache = TeacherCache(cache_path)
    spec = checkpoint["model"]
    if not spec.get("normalize_output") or spec.get("out_dim") != cache.header.embed_dim:
        raise PipelineError(f"{student}: not a distilled student embedding into {cache_path}'s "
                            f"{cache.header.embed_dim}-d anchor space (a supervised reference?); "
                            f"pass --student with a checkpoint written by distill")
    cache.require_student(student, checkpoint, fix=other_run_fix(cache_path, recorded_train(checkpoint).get("cache")))
    classes = read_classes(shards)
    check_classes(classes, cache, shards)
    tau = float(checkpoint.get("params", {}).get("tau_student", tau_student))
    anchors, anchor_classes = cache.anchors().float(), cache.anchor_classes()
    cache.close()  # the header is all that is asked of it from here on
    return AnchorClassifier(model, checkpoint, anchors, anchor_classes, classes, tau, cache, student)


def other_run_fix(cache: Path, recorded: str | None) -> str:
    """What to do about a student and a cache from different runs, given the cache its checkpoint records."""
    if not recorded:
        return "pass --cache with the cache the student was distilled from"
    if not Path(recorded).exists():
        return f"pass --cache with the cache the student was distilled from (its checkpoint records {recorded}, " \
               f"not found here)"
    if Path(recorded).resolve() == cache.resolve():
        return f"{cache} was made again since the student was distilled; re-run distill, or pass --cache with " \
               f"the cache the student was distilled from"
    return f"pass --cache {recorded} (the cache its checkpoint records), or no --cache"


def recorded_train(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The train section of the config the student was distilled with (empty if not recorded)."""
    train = checkpoint.get("params", {}).get("train", {})
    return train if isinstance(train, dict) else {}


def locate(name: str, option: Path | None, recorded: str | None, params: Path) -> Source:
    """`--NAME`, else the path the student's checkpoint records if it exists here, else the params' probe.NAME."""
    if option is not None:
        return Source(option, f"--{name}")
    if recorded and Path(recorded).exists():
        return Source(Path(recorded), "the student's checkpoint")
    return Source(Path(getattr(load_config("probe", params), name)), f"probe.{name} of the params")


def open_classifier(files: StudentFiles, tau_student: float) -> tuple[AnchorClassifier, str]:
    """The classifier of `files`, and a line saying which files it uses and where each path came from."""
    student = locate("student", files.student, None, files.params)
    model, checkpoint = load_student(student.path)
    recorded = recorded_train(checkpoint)
    cache = locate("cache", files.cache, recorded.get("cache"), files.params)
    shards = locate("shards", files.shards, recorded.get("shards"), files.params)
    classifier = anchor_classifier(model, checkpoint, student.path, cache.path, shards.path, tau_student)
    return classifier, (f"params {files.params}; student {student}, {classifier.image_size}px, tau "
                        f"{classifier.tau:g}; cache {cache}, {classifier.anchors.shape[0]} anchors over "
                        f"{len(classifier.classes)} classes; shards {shards}")


def check_teacher(classifier: AnchorClassifier, teacher: TeacherConfig, or_else: str) -> str:
    """Refuse (before it is built) a teacher the cache was not made by; returns its part of the info line."""
    recorded = classifier.checkpoint.get("params", {}).get("teacher")
    hint = f" (the student's checkpoint records {teacher_options(recorded)})" if isinstance(recorded, dict) else ""
    classifier.cache.require(teacher_identity=teacher_identity(teacher),
                             fix=f"pass the --teacher-* options of the teacher that made it{hint}, or fix the "
                                 f"params' teacher section, {or_else}")
    return "teacher " + " ".join(f"{key}={value}" for key, value in to_dict(teacher).items() if value)


def teacher_options(teacher: dict[str, Any]) -> str:
    """'--teacher-model ViT-B-32 --teacher-pretrained openai': the options naming a recorded teacher."""
    return " ".join(f"--teacher-{key} {value}" for key, value in teacher.items() if value) or "no teacher options"


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
    """The teacher of `config` (already checked against the cache by `check_teacher`), built."""
    assert config.teacher is not None
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
    assert config.teacher is not None or not config.show_teacher
    files = image_files(config.inputs)
    classifier, uses = open_classifier(config.files, config.tau_student)
    if config.teacher is not None:
        uses += "; " + check_teacher(classifier, config.teacher,
                                     "or drop --teacher" if config.show_teacher else "or give no teacher options")
    log.info("%s", uses)
    encoders = {"student": student_encoder(classifier, config.device)}
    if config.show_teacher:
        encoders["teacher"] = teacher_encoder(classifier, config)
    predictions: list[dict[str, Any]] = []
    for batch in chunks(read_images(files), BATCH_SIZE):
        predictions.extend(predict_batch(batch, encoders, classifier, config.top))
    if all("error" in p for p in predictions):
        raise PipelineError(f"{' '.join(map(str, config.inputs))}: none of the {len(files)} file(s) could be "
                            f"read as an image; give JPEG, PNG or other image files")
    if config.json is not None:
        write_json(config.json, {"student": str(classifier.student), "cache": str(classifier.cache.path),
                                 "tau_student": classifier.tau, "image_size": classifier.image_size,
                                 "predictions": predictions})
    return predictions


def print_prediction(prediction: dict[str, Any], models: Sequence[str]) -> None:
    print(prediction["file"])
    for name in models:
        print(f"  {name:<8} " + " | ".join(f"{c['probability']:.3f} {c['name']}" for c in prediction[name]))
