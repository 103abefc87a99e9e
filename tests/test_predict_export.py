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
from pipeline.teacher import load_teacher, parse_identity
from pipeline.views import eval_view
from stages import distill, precompute, predict
from stages.predict import StudentFiles, class_probabilities, open_classifier
from tests.conftest import ROOT, make_tiny_teacher, precompute_config, stage_config, write_image

SIZE = 32


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "250"})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def info_line(stderr: str, logger: str) -> str:
    """The one info line of predict or export: which files, and where each path came from."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"INFO {logger}: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def params_elsewhere(directory: Path, **changes: dict) -> Path:
    """A copy of params.yaml whose probe section names files that do not exist, with section `changes`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["probe"].update(student=str(directory / "missing/student.pt"), cache=str(directory / "missing/cache.h5"),
                           shards=str(directory / "missing/shards"))
    for section, values in changes.items():
        params[section].update(values)
    path = directory / "params-elsewhere.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def cli_in_process(*args: str, capsys, caplog) -> tuple[int, str, list[str]]:
    """The command line in this process (no interpreter start): exit code, stderr, info lines of the stages."""
    from pipeline.__main__ import main

    caplog.clear()
    code = main(list(args))
    return code, capsys.readouterr().err, [r.getMessage() for r in caplog.records
                                           if r.name.startswith("stages.") and r.levelname == "INFO"]


def teacher_options(teacher: tuple[Path, Path]) -> list[str]:
    config, weights = teacher
    return ["--teacher-config", str(config), "--teacher-checkpoint", str(weights)]


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
def other_cache(demo_shards, tiny_teacher, tmp_path_factory) -> Path:
    """A cache of the same teacher and shards with other prompts (plain, not cpa): other anchors."""
    cache = tmp_path_factory.mktemp("other") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, cache, tiny_teacher, views=1, **{
        "prompts.set": "plain", "prompts.plain_templates": str(ROOT / "data/prompts/demo_plain.txt")}))
    return cache


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
        predict.run(predict.PredictConfig(inputs=(images["broken"],), files=StudentFiles(
            trained["student"], trained["cache"], trained["shards"]), tau_student=0.05, tau_teacher=0.05,
            device="cpu"))
    # params.yaml names the demo teacher; the cache was made by the tiny one
    result = cli("predict", "--teacher", "--student", str(trained["student"]), "--cache", str(trained["cache"]),
                 "--shards", str(trained["shards"]), str(images["files"][0]))
    line = one_line_error(result)
    assert line.startswith(f"error: {trained['cache']}: made by another teacher") and line.endswith("or drop --teacher")


def load_classifier(student: Path, cache: Path, shards: Path) -> predict.AnchorClassifier:
    return open_classifier(StudentFiles(student, cache, shards), tau_student=0.05)[0]


def test_student_and_classes_must_fit_the_cache(trained, tmp_path):
    checkpoint = torch.load(trained["student"], weights_only=True)
    checkpoint["model"]["normalize_output"] = False  # what the supervised reference writes
    torch.save(checkpoint, tmp_path / "supervised.pt")
    with pytest.raises(PipelineError, match="not a distilled student embedding into"):
        load_classifier(tmp_path / "supervised.pt", trained["cache"], trained["shards"])
    classes = json.loads((trained["shards"] / "classes.json").read_text())
    classes[5]["name"] = "heron"
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(PipelineError, match=r"class 'heron' \(index 5\) appears in none of .*'s prompts"):
        load_classifier(trained["student"], trained["cache"], tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps(classes[:-1]))
    with pytest.raises(PipelineError, match="47 classes, but .* has 48"):
        load_classifier(trained["student"], trained["cache"], tmp_path)


def test_predict_takes_the_cache_and_shards_the_student_records(trained, images, tmp_path, capsys, caplog):
    """After a run made with another params file, the student's checkpoint still finds its cache and shards."""
    params = params_elsewhere(tmp_path)
    out = tmp_path / "predictions.json"
    result = cli("--params", str(params), "predict", "--student", str(trained["student"]), "--json", str(out),
                 str(images["files"][0]))
    assert result.returncode == 0, result.stderr
    prediction = json.loads(out.read_text())
    assert prediction["cache"] == str(trained["cache"])
    best, probability = reference_top1(trained, images["files"][0])
    assert prediction["predictions"][0]["student"][0]["class"] == best
    assert prediction["predictions"][0]["student"][0]["probability"] == pytest.approx(probability, abs=1e-5)
    assert info_line(result.stderr, "stages.predict").startswith(
        f"INFO stages.predict: params {params}; student {trained['student']} (from --student), {SIZE}px, tau 0.07; "
        f"cache {trained['cache']} (from the student's checkpoint), 48 anchors over 48 classes; "
        f"shards {trained['shards']} (from the student's checkpoint)")

    # a checkpoint whose recorded paths are gone here: the params' probe section, then an option, decide
    checkpoint = torch.load(trained["student"], weights_only=True)
    checkpoint["params"]["train"].update(cache=str(tmp_path / "gone.h5"), shards=str(tmp_path / "gone"))
    moved = tmp_path / "moved-student.pt"
    torch.save(checkpoint, moved)
    params = params_elsewhere(tmp_path, probe={"student": str(moved), "cache": str(trained["cache"])})
    code, err, info = cli_in_process("--params", str(params), "predict", "--shards", str(trained["shards"]),
                                     "--json", str(out), str(images["files"][0]), capsys=capsys, caplog=caplog)
    assert code == 0, err
    assert json.loads(out.read_text())["predictions"][0]["student"][0]["class"] == best
    assert len(info) == 1 and f"student {moved} (from probe.student of the params)" in info[0]
    assert f"cache {trained['cache']} (from probe.cache of the params)" in info[0]
    assert f"shards {trained['shards']} (from --shards)" in info[0]
    code, err, info = cli_in_process("--params", str(params), "predict", str(images["files"][0]), capsys=capsys,
                                     caplog=caplog)
    assert code == 2 and not info
    assert err == f"error: {tmp_path}/missing/shards/classes.json: not found; shard directories need a classes.json\n"


def test_a_student_and_a_cache_from_different_runs_are_refused(trained, other_cache, images, tmp_path):
    line = one_line_error(cli("predict", "--student", str(trained["student"]), "--cache", str(other_cache),
                              "--shards", str(trained["shards"]), str(images["files"][0])))
    # the message names both files (the wording of the check itself is `TeacherCache.require_student`'s)
    assert line.startswith(f"error: {trained['student']}: distilled against another prompt set than {other_cache}")
    assert line.endswith(f"; pass --cache {trained['cache']} (the cache its checkpoint records), or no --cache")
    # the cache the checkpoint records was made again since (here: the checkpoint records the other cache)
    checkpoint = torch.load(trained["student"], weights_only=True)
    checkpoint["params"]["train"]["cache"] = str(other_cache)
    torch.save(checkpoint, tmp_path / "student.pt")
    with pytest.raises(PipelineError, match=rf"student.pt: distilled against .*{other_cache}.*; {other_cache} was "
                                            rf"made again since the student was distilled; re-run distill"):
        open_classifier(StudentFiles(tmp_path / "student.pt", shards=trained["shards"]), 0.05)


def test_predict_with_the_teacher(trained, images, tiny_teacher, tmp_path):
    # params.yaml names the demo teacher: the options name the tiny one, which made the cache
    out = tmp_path / "predictions.json"
    result = cli("predict", "--teacher", *teacher_options(tiny_teacher), "--student", str(trained["student"]),
                 "--cache", str(trained["cache"]), "--shards", str(trained["shards"]), "--json", str(out),
                 "--top", "3", str(images["files"][0]))
    assert result.returncode == 0, result.stderr
    prediction = json.loads(out.read_text())["predictions"][0]
    assert len(prediction["student"]) == 3 and len(prediction["teacher"]) == 3
    # the teacher's best class is the one its embedding is closest to among the cache's anchors
    config, weights = tiny_teacher
    teacher = load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config)),
                           "cpu")
    image = decode_rgb(images["files"][0].read_bytes())
    similarity = teacher.encode_image(eval_view(image, teacher.image_size)[None]) @ TeacherCache(
        trained["cache"]).anchors().T
    assert prediction["teacher"][0]["class"] == int(similarity.argmax())
    assert "  teacher  " in result.stdout
    assert info_line(result.stderr, "stages.predict").endswith(f"; teacher checkpoint={weights} config={config}")


def test_predict_refuses_other_teacher_weights_before_building_a_model(trained, images, tiny_teacher, tmp_path,
                                                                       monkeypatch, capsys):
    from pipeline.__main__ import main

    config, weights = tiny_teacher
    other_config, other_weights = make_tiny_teacher(tmp_path / "other", seed=1)  # same architecture, other weights
    other_weights = other_weights.rename(other_weights.with_name("other-clip.safetensors"))

    def build(*args, **kwargs):
        raise AssertionError("the teacher was built before it was checked against the cache")

    monkeypatch.setattr(predict, "load_teacher", build)
    code = main(["predict", "--teacher", "--teacher-config", str(config), "--teacher-checkpoint", str(other_weights),
                 "--student", str(trained["student"]), "--cache", str(trained["cache"]), "--shards",
                 str(trained["shards"]), str(images["files"][0])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {trained['cache']}: made by another teacher")
    assert err.strip().endswith(f"(the student's checkpoint records --teacher-checkpoint {weights} "
                                f"--teacher-config {config}), or fix the params' teacher section, or drop --teacher")


@pytest.fixture(scope="module")
def exported(trained, tiny_teacher, tmp_path_factory):
    """export through the command line: the student only, with the teacher options (checked against
    the cache); the cache and shards from its checkpoint, the params' fallback tau 0.5 unused."""
    out = tmp_path_factory.mktemp("export") / "student"
    params = params_elsewhere(out.parent, distill={"tau_student": 0.5})
    result = cli("--params", str(params), "export", "--student", str(trained["student"]),
                 *teacher_options(tiny_teacher), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_export_takes_the_teacher_options(trained, exported, tiny_teacher, tmp_path, capsys, caplog):
    out, result = exported
    config, weights = tiny_teacher
    line = info_line(result.stderr, "stages.export")
    assert f"cache {trained['cache']} (from the student's checkpoint)" in line
    assert f"shards {trained['shards']} (from the student's checkpoint)" in line
    assert line.endswith(f"; teacher checkpoint={weights} config={config}")
    for name in ["student.torchscript.pt", "student.onnx", "anchors.npy", "classes.json"]:
        assert (out / name).is_file() and f"wrote {out / name} (" in result.stdout
    # classes.json holds the cache's teacher identity as an object, field by field
    header = TeacherCache(trained["cache"]).header
    identity = json.loads((out / "classes.json").read_text())["teacher_identity"]
    assert isinstance(identity, dict) and identity and identity == parse_identity(header.teacher_identity)

    # a teacher the cache was not made by: refused in one line, nothing written
    refused = tmp_path / "refused"
    files = ["--student", str(trained["student"]), "--cache", str(trained["cache"]), "--shards", str(trained["shards"])]
    code, err, _ = cli_in_process("export", *files, "--teacher-config", str(config), "--teacher-checkpoint",
                                  str(tmp_path / "missing.safetensors"), "--out", str(refused), capsys=capsys,
                                  caplog=caplog)
    assert code == 2 and len(err.splitlines()) == 1 and "--teacher-checkpoint" in err, err
    assert str(tmp_path / "missing.safetensors") in err
    other_config, other_weights = make_tiny_teacher(tmp_path / "other", seed=1)
    other_weights = other_weights.rename(other_weights.with_name("other-clip.safetensors"))
    code, err, info = cli_in_process("export", *files, "--teacher-config", str(config), "--teacher-checkpoint",
                                     str(other_weights), "--out", str(refused), capsys=capsys, caplog=caplog)
    assert code == 2 and len(err.splitlines()) == 1 and not info, err
    assert err.startswith(f"error: {trained['cache']}: made by another teacher")
    assert err.endswith("or fix the params' teacher section, or give no teacher options\n")
    assert not refused.exists()


def test_exported_models_give_the_pytorch_embeddings(trained, exported):
    out, result = exported
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
    shown = re.search(r"max \|exported - PyTorch\| embedding difference: torchscript (\S+), onnx (\S+)$",
                      result.stdout.strip())
    assert shown and max(float(shown[1].rstrip(",")), float(shown[2])) <= 1e-4, result.stdout

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
    """The python blocks of docs/using-the-student.md (README links it), by what they run on:
    onnxruntime, open_clip, or torch alone."""
    text = (ROOT / "docs" / "using-the-student.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    runtimes = [next((name for name in ("onnxruntime", "open_clip") if f"import {name}" in block), "torch")
                for block in blocks]
    assert len(set(runtimes)) == len(runtimes), f"one snippet per runtime: {runtimes}"
    return dict(zip(runtimes, blocks, strict=True))


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
