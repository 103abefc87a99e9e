"""`python -m pipeline export --out DIR`: the student as files that run without this package.

Two formats (`--format`). `standalone` (the default) writes, each atomically (temporary name,
then rename):
- `student.torchscript.pt`: TorchScript (scripted, so both input kinds work): (B, 3, S, S)
  uint8 in 0..255 or float in [0, 1] -> (B, D) L2-normalised embeddings; the input
  normalisation is inside the model;
- `student.onnx`: the same image encoder as ONNX (input `pixels`: float32 in [0, 1], dynamic
  batch; output `embeddings`);
- `anchors.npy`: the cache's anchors (K, D) float32, unit norm;
- `classes.json`: image size, input convention, tau, the cache's anchor digest and teacher
  identity (an object: `pipeline.teacher.parse_identity`), the classes (index, id, name, label)
  and, per anchor, its class index and label.

The student, its cache and its shards are found as `predict` finds them (`--student`, `--cache`,
`--shards`, else the student's checkpoint, else the params' probe section); teacher options, if
given, are checked against the cache (the teacher is not built).

Classify: cosine of the embedding with the anchors, per class the best anchor, softmax over
classes of score / tau — what `predict` does (README, "Using the student").
After writing, the exported models are run on a random batch and compared with the PyTorch
student; the largest absolute differences are printed and returned.

`open_clip` writes the student as a small CLIP that open_clip loads offline: the student's image
embedding as a timm vision tower, with the teacher's own text tower (an open_clip teacher is
needed: the params' teacher section with the teacher options over it, checked against the cache,
then built). Files: `open_clip_config.json` and `open_clip_model.safetensors` (open_clip's folder
and Hugging Face hub layout: `create_model_and_transforms("local-dir:DIR")` reads both, the
preprocessing included), `csm-student.json` (the model config alone, for
`open_clip.add_model_config(DIR)`), `README.md` (a model card) and `config.json` (what was
exported, from what, and the check's differences). The mapping, and what open_clip cannot hold
(refused in one line each):
- the backbone is timm's trunk (`visual.trunk.*`): a `timm/NAME` student's is its own, a
  torchvision ResNet's loads into timm's ResNet of the same name (same parameter names, strict
  load); other torchvision models have no timm twin (train with `--arch timm/NAME`);
- head `linear` -> `timm_proj: null`: open_clip then builds the trunk with `num_classes=embed_dim`,
  and the trunk's own classifier (a Linear with bias, after the pooling and any head layers the
  model has, as the student's features) is the projection; `clip-mlp` -> `timm_proj: mlp`,
  `timm_proj_bias: true` (`visual.head.mlp.*`), when the trunk's `num_features` is the student's
  feature width (not MobileNetV3's: its Mlp would take the 576 channels before its conv_head);
  `mlp` (Linear-BatchNorm-ReLU-Linear) has no open_clip equivalent (its mlp is Linear-GELU-Linear);
- MS-CLIP teachers are not open_clip models (`pipeline.small_clip.SmallCLIP` pairs the student
  with any teacher's text tower in Python).
After writing, the folder is loaded as a user would (`local-dir:`) and `encode_image` (on pixels
normalised by its preprocess config) and `encode_text` are compared with the student and the
teacher in float32: above OPEN_CLIP_MAX_DIFFERENCE the export is an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import timm
import torch
import torchvision
from torch import nn

from pipeline.atomic import atomic_path, write_json, write_text
from pipeline.config import TeacherConfig, load_config
from pipeline.errors import PipelineError, reason
from pipeline.student import TIMM_PREFIX
from pipeline.teacher import TWO_TOWER_KIND, Teacher, TeacherSpec, load_teacher, parse_identity, resolve_teacher
from stages.predict import AnchorClassifier, StudentFiles, check_teacher, open_classifier

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "student.torchscript.pt"
ONNX_FILE = "student.onnx"
ANCHORS_FILE = "anchors.npy"
CLASSES_FILE = "classes.json"
INPUT_CONVENTION = (
    "RGB batch (B, 3, S, S), S = image_size: uint8 in 0..255 or float32 in [0, 1] for TorchScript, "
    "float32 in [0, 1] for ONNX; mean/std normalisation is inside the model. Evaluation view: "
    "resize the shorter side to S (bicubic, antialiased), then crop the centre S x S."
)
MAX_DIFFERENCE = 1e-4  # float32 kernels differ in summation order, not more
CHECK_BATCH = 3  # not the export example's batch size, so the dynamic batch axis is exercised
FORMATS = ("standalone", "open_clip")

OPEN_CLIP_NAME = "csm-student"  # the model name `open_clip.add_model_config(DIR)` registers
OPEN_CLIP_MODEL_CONFIG = f"{OPEN_CLIP_NAME}.json"  # the model config alone (a preprocess_cfg key breaks CLIP())
OPEN_CLIP_CONFIG = "open_clip_config.json"  # model_cfg + preprocess_cfg: what `local-dir:` and `hf-hub:` read
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the file name open_clip looks for first in a folder or hub repo
MODEL_CARD = "README.md"
EXPORT_CONFIG = "config.json"
OPEN_CLIP_MAX_DIFFERENCE = 1e-5  # the same modules on the same float32 weights: rounding only


def write_via_temporary(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path`: the output never holds a partial file. For writers
    that need a path (torch.jit.save, torch.onnx.export); text goes through `write_json`."""
    with atomic_path(path) as tmp:
        write(tmp)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append .npy
        np.save(f, array.astype(np.float32))


def classes_payload(classifier: AnchorClassifier) -> dict[str, Any]:
    labels = classifier.labels
    return {
        "image_size": classifier.image_size,
        "input": INPUT_CONVENTION,
        "tau": classifier.tau,
        "scores": "per class, the best cosine between the embedding and the class's anchors; "
                  "probabilities = softmax(scores / tau)",
        "embedding_dim": int(classifier.anchors.shape[1]),
        "anchor_mode": classifier.cache.header.anchor_mode,
        "anchor_digest": classifier.cache.header.prompt_digest,
        "teacher_identity": parse_identity(classifier.cache.header.teacher_identity),
        "classes": [{"index": c.index, "id": c.id, "name": c.name, "label": label}
                    for c, label in zip(classifier.classes, labels, strict=True)],
        "anchors": [{"index": k, "class": int(c), "label": labels[int(c)]}
                    for k, c in enumerate(classifier.anchor_classes.tolist())],
    }


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch.jit warns it is deprecated on every call; TorchScript is still what runs with torch alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def export_torchscript(model: torch.nn.Module, path: Path) -> None:
    with quiet_torchscript():
        scripted = torch.jit.script(model)  # scripted, not traced: the uint8 / float branch stays
        write_via_temporary(path, lambda tmp: torch.jit.save(scripted, str(tmp)))


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 (torch.onnx's exporter imports it; checked here for a one-line error)
    except ImportError:
        raise PipelineError(f"{path}: exporting to ONNX needs onnx and onnxscript; "
                            f"pip install onnx onnxscript (project dependencies)") from None
    example = torch.rand(2, 3, image_size, image_size)

    def write(tmp: Path) -> None:
        # The torch.export-based exporter (torch's default; needs onnxscript); one file, no external data.
        torch.onnx.export(model, (example,), str(tmp), input_names=["pixels"], output_names=["embeddings"],
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, dynamo=True,
                          external_data=False, verbose=False)

    write_via_temporary(path, write)


def max_differences(model: torch.nn.Module, out: Path, image_size: int) -> dict[str, float]:
    """Largest |exported - PyTorch| embedding value on one random batch, per exported model."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(CHECK_BATCH, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        reference = model(pixels)
        with quiet_torchscript():
            scripted = torch.jit.load(str(out / TORCHSCRIPT_FILE))
        differences = {"torchscript": float((scripted(pixels) - reference).abs().max())}
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime not installed: %s not compared with the PyTorch student", ONNX_FILE)
        return differences
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    embeddings = session.run(None, {"pixels": pixels.numpy()})[0]
    differences["onnx"] = float(np.abs(embeddings - reference.numpy()).max())
    return differences


def warn_if_different(differences: dict[str, float]) -> None:
    for name, value in differences.items():
        if value > MAX_DIFFERENCE:
            log.warning("%s model differs from the PyTorch student by up to %.2e (expected <= %.0e)",
                        name, value, MAX_DIFFERENCE)


def print_written(paths: list[Path]) -> None:
    for path in paths:
        size_bytes = path.stat().st_size
        print(f"wrote {path} ({size_bytes / 1e6:.1f} MB)" if size_bytes >= 1e5 else
              f"wrote {path} ({size_bytes / 1e3:.1f} kB)")


def run(files: StudentFiles, out: Path, tau_student: float, teacher: TeacherConfig | None = None,
        export_format: str = "standalone") -> dict[str, Any]:
    """Write the student under `out` in `export_format`; returns the files' paths and the check's max
    differences.

    The student, cache and shards are found as for `predict`; `teacher` (the teacher options given),
    if any, must be the teacher the cache was made by (checked; built only for `open_clip`, which
    takes the params' teacher section when no option is given).
    """
    if export_format not in FORMATS:
        raise PipelineError(f"option --format {export_format}: expected one of {', '.join(FORMATS)}")
    classifier, uses = open_classifier(files, tau_student)
    if export_format == "open_clip":
        return export_open_clip(classifier, uses, out, teacher or load_config("probe", files.params).teacher,
                                files.params)
    if teacher is not None:
        uses += "; " + check_teacher(classifier, teacher, "or give no teacher options")
    log.info("%s", uses)
    model = classifier.model.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    size = classifier.image_size
    export_torchscript(model, out / TORCHSCRIPT_FILE)
    export_onnx(model, size, out / ONNX_FILE)
    write_via_temporary(out / ANCHORS_FILE, lambda tmp: save_npy(tmp, classifier.anchors.numpy()))
    write_json(out / CLASSES_FILE, classes_payload(classifier))
    differences = max_differences(model, out, size)
    warn_if_different(differences)
    files = [out / name for name in (TORCHSCRIPT_FILE, ONNX_FILE, ANCHORS_FILE, CLASSES_FILE)]
    print_written(files)
    print(f"{classifier.anchors.shape[0]} anchors over {len(classifier.classes)} classes, {size}px input, "
          f"tau {classifier.tau:g}; max |exported - PyTorch| embedding difference: "
          + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))
    return {"files": [str(p) for p in files], "max_abs_difference": differences}


# --- the open_clip format -----------------------------------------------------------------------


@dataclass(frozen=True)
class VisionTower:
    """The student as open_clip's timm vision tower: its `vision_cfg` and its weights (`visual.*`)."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def timm_trunk_name(arch: str, backbone: nn.Module, where: str) -> str:
    """The timm model open_clip builds as the trunk of a student with backbone `arch`."""
    if arch.startswith(TIMM_PREFIX):
        return arch.removeprefix(TIMM_PREFIX)
    if isinstance(backbone, torchvision.models.ResNet) and timm.is_model(arch):
        return arch  # timm's ResNet of the same name has the same parameter names (checked by a strict load)
    raise PipelineError(f"{where}: a torchvision model that open_clip cannot hold (its vision towers are timm "
                        f"models, and only torchvision's ResNets have a timm twin); train with --arch timm/NAME "
                        f"for an open_clip export, or export --format standalone")


def global_pool(backbone: nn.Module) -> str:
    """The student's pooling, as `timm_pool` names it: timm's own (`avg` for CNNs, `token` for a ViT)."""
    pool = getattr(backbone, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return getattr(pool, "pool_type", "avg")  # torchvision's ResNets average-pool


def vision_tower(classifier: AnchorClassifier) -> VisionTower:
    """The student's backbone and head under open_clip's `TimmModel` names; refuses what it cannot hold."""
    student, spec = classifier.model, classifier.checkpoint["model"]
    where = f"{classifier.student}: --arch {spec['arch']} --head {spec['head']}"
    if spec["head"] == "mlp":
        raise PipelineError(f"{where}: open_clip has no Linear-BatchNorm-ReLU-Linear projection (its mlp is "
                            f"Linear-GELU-Linear); train with --head clip-mlp (or linear) for an open_clip export, "
                            f"or export --format standalone")
    name = timm_trunk_name(spec["arch"], student.backbone, where)
    pool = global_pool(student.backbone)
    if spec["head"] == "linear":
        # timm_proj null: TimmModel builds the trunk with num_classes=embed_dim; its own classifier (a
        # Linear with bias, after pooling and the model's head layers: the student's features) projects
        trunk = timm.create_model(name, pretrained=False, num_classes=spec["out_dim"], global_pool=pool)
        projection = next(n for n, m in trunk.named_modules() if m is trunk.get_classifier())
        trunk_state = {**student.backbone.state_dict(),
                       **{f"{projection}.{k}": v for k, v in student.head.state_dict().items()}}
        head_state: dict[str, torch.Tensor] = {}
    else:  # clip-mlp: TimmModel's head, Mlp(trunk.num_features, 2 embed_dim, embed_dim), on the pooled trunk
        trunk = timm.create_model(name, pretrained=False)
        trunk.reset_classifier(0, global_pool=pool)
        if trunk.num_features != student.feature_dim:
            raise PipelineError(f"{where}: open_clip's mlp projection takes timm's num_features "
                                f"({trunk.num_features}), but the student's head takes its {student.feature_dim} "
                                f"pooled features; train this arch with --head linear for an open_clip export")
        trunk_state, head_state = student.backbone.state_dict(), student.head.state_dict()
    try:
        trunk.load_state_dict(trunk_state, strict=True)
    except RuntimeError as err:
        raise PipelineError(f"{where}: its weights do not fit timm's {name} ({reason(err)})") from None
    config = {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": pool,
              "timm_proj": "mlp" if head_state else None, "timm_proj_bias": bool(head_state),
              "image_size": classifier.image_size}
    state = {f"visual.trunk.{k}": v for k, v in trunk_state.items()}
    state.update({f"visual.head.{k}": v for k, v in head_state.items()})
    return VisionTower(config, state)


def open_clip_teacher(config: TeacherConfig, classifier: AnchorClassifier) -> tuple[TeacherSpec, Teacher, str]:
    """The teacher whose text tower the export takes: an open_clip model (refused otherwise), the one
    the cache was made by (checked before it is built), built in float32 on the CPU."""
    spec = resolve_teacher(config)
    if spec.arch_kind != TWO_TOWER_KIND:
        raise PipelineError(f"teacher {spec.name} (the params' teacher section with the --teacher-* options over "
                            f"it): an {spec.arch_kind} model, which open_clip cannot build; "
                            f"export --format standalone works with any teacher, and pipeline.small_clip.SmallCLIP "
                            f"pairs the student with any teacher's text tower in Python")
    uses = check_teacher(classifier, config, "or export --format standalone (which needs no teacher)")
    return spec, load_teacher(config, "cpu", precision="fp32"), uses


def open_clip_model_config(spec: TeacherSpec, embed_dim: int, vision_cfg: dict[str, Any]) -> dict[str, Any]:
    """The teacher's model config (text tower, activation, logit settings) with the student's vision tower."""
    rest = {k: v for k, v in spec.model_config.items() if k not in ("arch", "embed_dim", "quick_gelu", "vision_cfg")}
    return {"embed_dim": embed_dim, "quick_gelu": spec.quick_gelu, "vision_cfg": vision_cfg, **rest}


def preprocess_config(classifier: AnchorClassifier) -> dict[str, Any]:
    """open_clip's preprocess config of the student's evaluation view (`pipeline.views.eval_view`: shorter
    side to S, bicubic, centre crop) and its normalisation (the Student's mean and std buffers)."""
    def shortest(buffer: torch.Tensor) -> list[float]:  # 0.485, not 0.48500001430511475: the same float32
        return [float(str(np.float32(v))) for v in buffer.flatten().tolist()]

    return {"size": classifier.image_size, "mode": "RGB", "mean": shortest(classifier.model.mean),
            "std": shortest(classifier.model.std), "interpolation": "bicubic", "resize_mode": "shortest"}


def save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    write_via_temporary(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def open_clip_differences(out: Path, classifier: AnchorClassifier, teacher: Teacher, texts: list[str]
                          ) -> dict[str, float]:
    """Load `out` as a user would (`local-dir:`, no weights elsewhere); the largest |open_clip - ours| of
    unit-norm image embeddings (pixels normalised by its own preprocess config) and text embeddings."""
    model = open_clip.create_model(f"local-dir:{out}", device="cpu").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    tokens = tokenizer(texts)
    if not torch.equal(tokens, teacher.tokenizer(texts)):
        raise PipelineError(f"{out}: open_clip's tokenizer for this folder is not the teacher's "
                            f"({type(tokenizer).__name__} vs {type(teacher.tokenizer).__name__}); use "
                            f"pipeline.small_clip.SmallCLIP for this teacher, or export --format standalone")
    preprocess = model.visual.preprocess_cfg
    mean, std = (torch.tensor(preprocess[key], dtype=torch.float32).view(1, 3, 1, 1) for key in ("mean", "std"))
    size = classifier.image_size
    pixels = torch.rand(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = model.encode_image((pixels - mean) / std, normalize=True)
        text = model.encode_text(tokens, normalize=True)
        student = classifier.model(pixels)
    return {"encode_image": float((image - student).abs().max()),
            "encode_text": float((text - teacher.encode_text(texts)).abs().max())}


def probe_table(params: Path, student: Path) -> str:
    """The probe's table as markdown, if the params' probe metrics were measured on this student after
    it was written ('' otherwise)."""
    try:
        metrics_path = Path(load_config("probe", params).out)
    except PipelineError:
        return ""
    probed = metrics_path.with_suffix(".config.json")  # the probe's resolved config, beside its metrics
    if not (metrics_path.is_file() and probed.is_file()):
        return ""
    recorded = Path(json.loads(probed.read_text()).get("student", ""))
    if not recorded.is_file() or recorded.resolve() != student.resolve() or \
            metrics_path.stat().st_mtime < student.stat().st_mtime:
        return ""
    metrics = json.loads(metrics_path.read_text())
    keys = ("linear_top1", "linear_top5", "zeroshot_top1", "zeroshot_top5")
    rows = ["| model | linear top-1 | linear top-5 | zero-shot top-1 | zero-shot top-5 |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {name} | " + " | ".join(f"{100 * row[k]:.1f}" if k in row else "-" for k in keys) + " |"
             for name, row in metrics.items() if isinstance(row, dict)]
    return f"Probe (`{metrics_path}`, percent):\n\n" + "\n".join(rows) + "\n"


LOAD_SNIPPET = '''\
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
'''


def model_card(classifier: AnchorClassifier, description: dict[str, Any], params: Path) -> str:
    """README.md of the export folder: what the model is, what it was distilled from and how, how to load it."""
    checkpoint = classifier.checkpoint
    trained = checkpoint.get("params", {})
    identity = description["teacher_identity"]
    cache = classifier.cache
    settings = {**{k: v for k, v in trained.items() if not isinstance(v, dict)}, **trained.get("train", {})}
    results = probe_table(params, classifier.student) or "No probe metrics of this student were found.\n"
    trunk = description["vision_cfg"]
    return "\n".join([
        f"# {OPEN_CLIP_NAME}: a small CLIP distilled by cross-modal similarity matching",
        "",
        f"Image tower: the student `{checkpoint['model']['arch']}` ({checkpoint['model']['head']} head) as "
        f"timm's `{trunk['timm_model_name']}`, {classifier.image_size} px; text tower: the teacher's, unchanged. "
        f"Embeddings: {description['embed_dim']}-d, the teacher's space.",
        "",
        "## Teacher",
        "",
        *[f"- {key}: `{value}`" for key, value in identity.items()],
        "",
        "## Data and training",
        "",
        f"Distilled against the cache `{cache.path}`: {cache.num_images} images in {len(cache.shard_names)} shards "
        f"of `{settings.get('shards', '?')}` ({cache.header.views_per_image} augmented views each), "
        f"{cache.header.num_anchors} anchors ({cache.header.prompt_set} prompts, {cache.header.anchor_mode} "
        f"anchors, digest `{cache.header.prompt_digest[:12]}`). Settings of the run (the student checkpoint's):",
        "",
        "| setting | value |", "|---|---|",
        *[f"| {key} | `{value}` |" for key, value in settings.items()],
        *([""] + ["Training result: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in checkpoint["metrics"].items())]
          if isinstance(checkpoint.get("metrics"), dict) else []),
        "",
        "## Results",
        "",
        results,
        "## Use",
        "",
        "With open_clip alone, offline (the preprocessing: shorter side to the image size, bicubic, centre crop, "
        "ImageNet's mean and std):",
        "",
        "```python",
        LOAD_SNIPPET.format(out="PATH/TO/THIS/FOLDER").rstrip(),
        "```",
        "",
        f"Or by name: `open_clip.add_model_config(folder)`, then `create_model_and_transforms(\"{OPEN_CLIP_NAME}\", "
        f"pretrained=f\"{{folder}}/{OPEN_CLIP_WEIGHTS}\", image_mean=..., image_std=...)` with the mean and std of "
        f"`{OPEN_CLIP_CONFIG}` (open_clip takes a named model's preprocessing from its download tags only).",
        "",
        "Checked at export: max |open_clip - PyTorch| on unit-norm embeddings: "
        + ", ".join(f"{k} {v:.2e}" for k, v in description["max_abs_difference"].items()) + ".",
        "",
    ])


def export_open_clip(classifier: AnchorClassifier, uses: str, out: Path, teacher_config: TeacherConfig,
                     params: Path) -> dict[str, Any]:
    """Write the student with the teacher's text tower as an open_clip model under `out` (module docstring)."""
    vision = vision_tower(classifier)  # refusals first: nothing is built or written for a student it cannot hold
    spec, teacher, teacher_uses = open_clip_teacher(teacher_config, classifier)
    log.info("%s; %s", uses, teacher_uses)
    embed_dim = classifier.checkpoint["model"]["out_dim"]
    assert teacher.embed_dim == embed_dim, "the cache's teacher embeds into the student's space"
    model_cfg = open_clip_model_config(spec, embed_dim, vision.config)
    preprocess = preprocess_config(classifier)
    text_state = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith("visual.")}
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / OPEN_CLIP_WEIGHTS, {**vision.state_dict, **text_state})
    write_json(out / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    write_json(out / OPEN_CLIP_MODEL_CONFIG, model_cfg)
    texts = classifier.cache.prompts()[:CHECK_BATCH]
    differences = open_clip_differences(out, classifier, teacher, texts)
    header = classifier.cache.header
    description = {
        "format": "open_clip", "open_clip_model": OPEN_CLIP_NAME,
        "files": {"weights": OPEN_CLIP_WEIGHTS, "open_clip_config": OPEN_CLIP_CONFIG,
                  "model_config": OPEN_CLIP_MODEL_CONFIG, "model_card": MODEL_CARD},
        "load": 'open_clip.create_model_and_transforms("local-dir:<this folder>")',
        "image_size": classifier.image_size, "embed_dim": embed_dim, "vision_cfg": vision.config,
        "preprocess_cfg": preprocess, "student": str(classifier.student),
        "student_model": classifier.checkpoint["model"], "anchor_digest": header.prompt_digest,
        "teacher_identity": parse_identity(header.teacher_identity), "open_clip": open_clip.__version__,
        "max_abs_difference": differences,
    }
    write_text(out / MODEL_CARD, model_card(classifier, description, params))
    write_json(out / EXPORT_CONFIG, description)
    files = [out / name for name in (OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_MODEL_CONFIG, MODEL_CARD,
                                     EXPORT_CONFIG)]
    print_written(files)
    print(f"open_clip model {OPEN_CLIP_NAME}: timm {vision.config['timm_model_name']}, {classifier.image_size}px, "
          f"{embed_dim}-d, the teacher's text tower; max |open_clip - PyTorch| embedding difference: "
          + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))
    worst = max(differences, key=differences.get)
    if differences[worst] > OPEN_CLIP_MAX_DIFFERENCE:
        raise PipelineError(f"{out}: open_clip's {worst} differs from ours by {differences[worst]:.2e} (more than "
                            f"{OPEN_CLIP_MAX_DIFFERENCE:.0e}): this student does not map onto open_clip exactly; "
                            f"use export --format standalone, or pipeline.small_clip.SmallCLIP")
    return {"files": [str(p) for p in files], "max_abs_difference": differences}
