"""`python -m pipeline export --out DIR`: the student as files that run without this package.

Writes, each atomically (temporary name, then rename):
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
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_path, write_json
from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.teacher import parse_identity
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


def run(files: StudentFiles, out: Path, tau_student: float, teacher: TeacherConfig | None = None) -> dict[str, Any]:
    """Write the four files under `out`; returns their paths and the check's max differences.

    The student, cache and shards are found as for `predict`; `teacher` (the teacher options given),
    if any, must be the teacher the cache was made by (checked, not built).
    """
    classifier, uses = open_classifier(files, tau_student)
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
    for path in files:
        size_bytes = path.stat().st_size
        print(f"wrote {path} ({size_bytes / 1e6:.1f} MB)" if size_bytes >= 1e5 else
              f"wrote {path} ({size_bytes / 1e3:.1f} kB)")
    print(f"{classifier.anchors.shape[0]} anchors over {len(classifier.classes)} classes, {size}px input, "
          f"tau {classifier.tau:g}; max |exported - PyTorch| embedding difference: "
          + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))
    return {"files": [str(p) for p in files], "max_abs_difference": differences}
