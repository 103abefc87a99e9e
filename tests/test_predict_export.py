"""predict and export: the student's top classes for image files, and the student as files that run
without this package (TorchScript, ONNX, anchors, class names) giving the same embeddings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

from pipeline.cache import TeacherCache
from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.shards import decode_rgb, iter_raw, list_shards
from pipeline.student import load_student
from pipeline.teacher import load_teacher
from pipeline.views import eval_view
from stages import distill, export, precompute, predict
from stages.predict import class_probabilities, load_classifier
from tests.conftest import ROOT, precompute_config, stage_config, write_image

SIZE = 32


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "250"})


@pytest.fixture(scope="module")
def trained(demo_shards, tiny_teacher, tmp_path_factory):
    """A cache of the tiny teacher over the demo shards and a student distilled 1 epoch at 32 px."""
    out = tmp_path_factory.mktemp("predict")
    cache = out / "teacher.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher, views=2))
    config, weights = tiny_teacher
    distill.run(stage_config(
        "distill", out=str(out / "student.pt"), run_dir=str(out / "run"), metrics=str(out / "distill.json"),
        plot=str(out / "distill.csv"), tau_student=0.07, **{
            "train.shards": str(demo_shards), "train.cache": str(cache), "train.image_size": SIZE,
            "train.batch_size": 32, "train.epochs": 1, "train.workers": 0, "train.warmup_epochs": 0.0,
            "teacher.config": str(config), "teacher.checkpoint": str(weights)}))
    return {"student": out / "student.pt", "cache": cache, "shards": demo_shards}


@pytest.fixture(scope="module")
def images(demo_shards, tmp_path_factory) -> dict[str, Path]:
    """Three demo val images as files, a folder (nested, with a PNG and a non-image file) and a broken JPEG."""
    root = tmp_path_factory.mktemp("images")
    raws = iter_raw(list_shards(demo_shards, "val")[0])
    files = []
    for i, raw in zip(range(5), raws, strict=False):
        path = root / ("files" if i < 3 else "folder/inner") / f"{raw['__key__']}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw["jpg"])
        files.append(path)
    write_image(root / "folder" / "wide.png", seed=3, fmt="PNG", size=(48, 30))
    (root / "folder" / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {"files": files[:3], "folder": root / "folder", "broken": root / "broken.jpg",
            "folder_images": [root / "folder" / "inner" / files[3].name, root / "folder" / "inner" / files[4].name,
                              root / "folder" / "wide.png"]}


def reference_top1(trained, path: Path) -> tuple[int, float]:
    """The student's best class for one image, computed here without the predict stage."""
    model, checkpoint = load_student(trained["student"])
    cache = TeacherCache(trained["cache"])
    with torch.no_grad():
        embedding = model(eval_view(decode_rgb(path.read_bytes()), SIZE)[None])
    similarity = (embedding @ cache.anchors().T)[0]
    # class anchors: anchor k is class k, so p_S is the distillation's own softmax over the anchors
    assert torch.equal(cache.anchor_classes(), torch.arange(similarity.shape[0]))
    probabilities = torch.softmax(similarity / 0.07, dim=0)
    return int(probabilities.argmax()), float(probabilities.max())


def test_class_probabilities_take_each_class_best_anchor():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # prompt mode: anchors 0 and 2 are class 0
    anchor_classes = torch.tensor([0, 1, 0])
    probabilities = class_probabilities(embeddings, anchors, anchor_classes, num_classes=2, tau=0.5)
    # image 0: class 0 best cosine 1.0 (anchor 0), class 1: 0.6; image 1: class 0: 1.0 (anchor 2), class 1: 0.8
    expected = torch.tensor([[np.exp(2.0), np.exp(1.2)], [np.exp(2.0), np.exp(1.6)]])
    torch.testing.assert_close(probabilities, (expected / expected.sum(1, keepdim=True)).float())


def test_predict_files_and_folder(trained, images, tmp_path):
    out = tmp_path / "predictions.json"
    result = cli("predict", "--student", str(trained["student"]), "--cache", str(trained["cache"]),
                 "--shards", str(trained["shards"]), "--json", str(out), *map(str, images["files"]),
                 str(images["broken"]), str(images["folder"]))
    assert result.returncode == 0, result.stderr
    predictions = json.loads(out.read_text())["predictions"]
    readable = [*images["files"], *images["folder_images"]]  # folder: recursive, sorted, images only
    assert [p["file"] for p in predictions] == [str(p) for p in [*images["files"], images["broken"],
                                                                 *images["folder_images"]]]
    assert "error" in predictions[3] and f"{images['broken']}: not readable as an image" in result.stderr
    shown = [p for p in predictions if "error" not in p]
    classes = json.loads((trained["shards"] / "classes.json").read_text())
    for path, prediction in zip(readable, shown, strict=True):
        assert len(prediction["student"]) == 5 and "teacher" not in prediction
        best, probability = reference_top1(trained, path)
        assert prediction["student"][0]["class"] == best
        assert prediction["student"][0]["probability"] == pytest.approx(probability, abs=1e-5)
        assert prediction["student"][0]["name"].startswith(classes[best]["name"])
        top = prediction["student"][0]
        assert f"{path}\n  student  {top['probability']:.3f} {top['name']} | " in result.stdout


def test_predict_refuses_no_images_and_a_foreign_teacher(trained, images, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    result = cli("predict", "--student", str(trained["student"]), "--cache", str(trained["cache"]), str(empty))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {empty}: no image files (.bmp, .gif, .jpeg, .jpg, .png, .ppm, .tif, .tiff, .webp); "
        f"give image files or folders holding them")
    with pytest.raises(PipelineError, match="none of the 1 file.s. could be read as an image"):
        predict.run(predict.PredictConfig(inputs=(images["broken"],), student=trained["student"],
                                          cache=trained["cache"], shards=trained["shards"], tau_student=0.05,
                                          tau_teacher=0.05, device="cpu"))
    # params.yaml names the demo teacher; the cache was made by the tiny one
    result = cli("predict", "--teacher", "--student", str(trained["student"]), "--cache", str(trained["cache"]),
                 "--shards", str(trained["shards"]), str(images["files"][0]))
    assert result.returncode == 2 and "made by teacher build differing from the params'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_student_and_classes_must_fit_the_cache(trained, tmp_path):
    checkpoint = torch.load(trained["student"], weights_only=True)
    checkpoint["model"]["normalize_output"] = False  # what the supervised reference writes
    torch.save(checkpoint, tmp_path / "supervised.pt")
    with pytest.raises(PipelineError, match="not a distilled student embedding into"):
        load_classifier(tmp_path / "supervised.pt", trained["cache"], trained["shards"], 0.05)
    classes = json.loads((trained["shards"] / "classes.json").read_text())
    classes[5]["name"] = "heron"
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(PipelineError, match=r"class 'heron' \(index 5\) appears in none of .*'s prompts"):
        load_classifier(trained["student"], trained["cache"], tmp_path, 0.05)
    (tmp_path / "classes.json").write_text(json.dumps(classes[:-1]))
    with pytest.raises(PipelineError, match="47 classes, but .* has 48"):
        load_classifier(trained["student"], trained["cache"], tmp_path, 0.05)


def test_predict_with_the_teacher(trained, images, tiny_teacher, tmp_path):
    config, weights = tiny_teacher
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["teacher"].update(model="", pretrained="", config=str(config), checkpoint=str(weights))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "predictions.json"
    result = cli("--params", str(tmp_path / "params.yaml"), "predict", "--teacher", "--student",
                 str(trained["student"]), "--cache", str(trained["cache"]), "--shards", str(trained["shards"]),
                 "--json", str(out), "--top", "3", str(images["files"][0]))
    assert result.returncode == 0, result.stderr
    prediction = json.loads(out.read_text())["predictions"][0]
    assert len(prediction["student"]) == 3 and len(prediction["teacher"]) == 3
    # the teacher's best class is the one its embedding is closest to among the cache's anchors
    teacher = load_teacher(TeacherConfig(**params["teacher"]), "cpu")
    image = decode_rgb(images["files"][0].read_bytes())
    similarity = teacher.encode_image(eval_view(image, teacher.image_size)[None]) @ TeacherCache(
        trained["cache"]).anchors().T
    assert prediction["teacher"][0]["class"] == int(similarity.argmax())
    assert "  teacher  " in result.stdout


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student"
    report = export.run(trained["student"], trained["cache"], trained["shards"], out, tau_student=0.5)
    return out, report


def test_exported_models_give_the_pytorch_embeddings(trained, exported):
    out, report = exported
    model, checkpoint = load_student(trained["student"])
    generator = torch.Generator().manual_seed(1)
    floats = torch.rand(5, 3, SIZE, SIZE, generator=generator)
    uint8 = (torch.rand(4, 3, SIZE, SIZE, generator=generator) * 255).to(torch.uint8)
    scripted = torch.jit.load(str(out / "student.torchscript.pt"))
    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for pixels in (floats, uint8):
            assert (scripted(pixels) - model(pixels)).abs().max() <= 1e-4
        assert (scripted(uint8) - model(uint8.float() / 255)).abs().max() <= 1e-4  # both input conventions agree
        for batch in (floats, floats[:1]):  # the batch axis is dynamic
            onnx_embeddings = session.run(["embeddings"], {"pixels": batch.numpy()})[0]
            assert np.abs(onnx_embeddings - model(batch).numpy()).max() <= 1e-4
    assert set(report["max_abs_difference"]) == {"torchscript", "onnx"}
    assert max(report["max_abs_difference"].values()) <= 1e-4

    cache = TeacherCache(trained["cache"])
    np.testing.assert_array_equal(np.load(out / "anchors.npy"), cache.anchors().numpy())
    meta = json.loads((out / "classes.json").read_text())
    assert meta["image_size"] == SIZE and meta["tau"] == 0.07  # the checkpoint's tau, not the fallback 0.5
    assert [a["class"] for a in meta["anchors"]] == cache.anchor_classes().tolist()
    classes = json.loads((trained["shards"] / "classes.json").read_text())
    assert [c["name"] for c in meta["classes"]] == [c["name"] for c in classes]
    assert {"crane (bird)", "crane (machine)"} <= {c["label"] for c in meta["classes"]}
    assert not list(out.glob("*.tmp"))


def readme_snippets() -> dict[str, str]:
    """The python blocks of README's "Using the student" section, by what they run on."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using the student\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {"onnxruntime" if "import onnxruntime" in block else "torch": block for block in blocks}


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_readme_snippet_classifies_like_predict(trained, images, exported, runtime, tmp_path):
    snippet = readme_snippets()[runtime]
    assert "pipeline" not in snippet and "stages" not in snippet
    script = tmp_path / "classify.py"
    script.write_text(snippet)
    files = [*images["files"], images["folder_images"][-1]]
    # this package is made unimportable: the snippet runs on the exported files alone
    guard = "import runpy, sys; sys.modules['pipeline'] = sys.modules['stages'] = None; " \
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", guard, str(script), str(exported[0]), *map(str, files)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(files)
    meta = json.loads((exported[0] / "classes.json").read_text())
    # onnxruntime's snippet resizes with PIL (torchvision's uint8 bicubic is within 1/255 of it)
    tolerance = 2e-3 if runtime == "torch" else 2e-2
    for path, line in zip(files, lines, strict=True):
        best, probability = reference_top1(trained, path)
        shown, top1 = line.removeprefix(f"{path} ").split(" | ")[0].split(" ", 1)
        assert top1 == meta["classes"][best]["label"], line
        assert float(shown) == pytest.approx(probability, abs=tolerance), line
