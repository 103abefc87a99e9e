"""export --format open_clip: the student with the teacher's text tower as a small CLIP that open_clip
loads offline, with no code of this package, giving the student's image embeddings and the teacher's
text embeddings; what open_clip cannot hold is refused in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cache import TeacherCache
from pipeline.config import TeacherConfig
from pipeline.shards import decode_rgb
from pipeline.student import build_student, load_student
from pipeline.teacher import load_teacher, parse_identity
from pipeline.views import eval_view
from stages import distill, export, precompute
from stages.predict import StudentFiles
from tests.conftest import ROOT, precompute_config, write_image
from tests.test_distill import distill_config
from tests.test_predict_export import cli, readme_snippets, teacher_options

SIZE = 32  # distill_config's image size
TEXTS = ["a photo of a red heart.", "a blue star", "crane"]

# Runs as a user would: a fresh interpreter, no hub, this package unimportable. Loads the folder
# through `local-dir:` and by name, and saves what each gives for pixels, image files and texts.
USER_SCRIPT = """
import json, sys
sys.modules["pipeline"] = sys.modules["stages"] = None
import open_clip, torch
from PIL import Image

folder, inputs, outputs = sys.argv[1:4]
data = torch.load(inputs)
preprocess_cfg = json.load(open(f"{folder}/open_clip_config.json"))["preprocess_cfg"]
open_clip.add_model_config(folder)
routes = {
    "local-dir": open_clip.create_model_and_transforms(f"local-dir:{folder}"),
    "name": open_clip.create_model_and_transforms("csm-student", pretrained=f"{folder}/open_clip_model.safetensors",
                                                  image_mean=preprocess_cfg["mean"], image_std=preprocess_cfg["std"]),
}
results = {}
for route, (model, _, preprocess) in routes.items():
    model.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}" if route == "local-dir" else "csm-student")(data["texts"])
    mean, std = (torch.tensor(model.visual.preprocess_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    files = torch.stack([preprocess(Image.open(path)) for path in data["files"]])
    with torch.no_grad():
        results[route] = {"tokens": tokens, "text": model.encode_text(tokens, normalize=True),
                          "pixels": model.encode_image((data["pixels"] - mean) / std, normalize=True),
                          "files": model.encode_image(files, normalize=True)}
torch.save(results, outputs)
"""


@pytest.fixture(scope="module")
def cache(demo_shards, tiny_teacher, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("open-clip-cache") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, path, tiny_teacher, views=1))
    return path


@pytest.fixture(scope="module")
def distilled(demo_shards, cache, tiny_teacher, tmp_path_factory):
    """student(arch, head): a checkpoint distilled 1 epoch at 32 px against `cache` (each made once)."""
    made: dict[tuple[str, str], Path] = {}

    def student(arch: str, head: str) -> Path:
        if (arch, head) not in made:
            out = tmp_path_factory.mktemp("student")
            distill.run(distill_config(demo_shards, cache, tiny_teacher, out, **{
                "train.epochs": 1, "train.arch": arch, "train.head": head}))
            made[arch, head] = out / "student.pt"
        return made[arch, head]

    return student


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    config, weights = tiny_teacher
    return load_teacher(TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config)), "cpu",
                        precision="fp32")


@pytest.fixture(scope="module")
def exported(distilled, tiny_teacher, tmp_path_factory):
    """A resnet18 student with the linear head, exported through the command line."""
    out = tmp_path_factory.mktemp("open-clip-export") / "csm-student"
    result = cli("export", "--format", "open_clip", "--student", str(distilled("resnet18", "linear")),
                 *teacher_options(tiny_teacher), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def run_offline(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_open_clip_loads_the_folder_as_the_student_and_the_teacher(exported, distilled, teacher, tmp_path):
    out, _ = exported
    files = [tmp_path / "wide.jpg", tmp_path / "tall.png"]  # resized by the shorter side, then centre-cropped
    write_image(files[0], seed=1, size=(48, 30))
    write_image(files[1], seed=2, fmt="PNG", size=(30, 44))
    pixels = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    torch.save({"pixels": pixels, "files": [str(p) for p in files], "texts": TEXTS}, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(USER_SCRIPT)
    result = run_offline([str(tmp_path / "load.py"), str(out), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "outputs.pt")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = torch.load(tmp_path / "outputs.pt")

    student, _ = load_student(distilled("resnet18", "linear"))
    with torch.no_grad():
        expected = {"pixels": student(pixels),
                    "files": student(torch.stack([eval_view(decode_rgb(p.read_bytes()), SIZE) for p in files]))}
    expected["text"] = teacher.encode_text(TEXTS)
    assert set(loaded) == {"local-dir", "name"}
    for route, outputs in loaded.items():
        assert torch.equal(outputs["tokens"], teacher.tokenizer(TEXTS)), route
        for key, reference in expected.items():
            assert (outputs[key] - reference).abs().max() <= 1e-5, (route, key)
    # not equal by accident: the two images and the texts embed apart
    assert (expected["files"][0] - expected["files"][1]).abs().max() > 1e-2
    assert (expected["text"][0] - expected["text"][1]).abs().max() > 1e-2


def test_export_prints_and_records_the_differences(exported):
    out, result = exported
    for name in ["open_clip_model.safetensors", "open_clip_config.json", "csm-student.json", "README.md",
                 "config.json"]:
        assert (out / name).is_file() and f"wrote {out / name} (" in result.stdout
    shown = re.search(r"max \|open_clip - PyTorch\| embedding difference: encode_image (\S+), encode_text (\S+)$",
                      result.stdout.strip())
    assert shown, result.stdout
    recorded = json.loads((out / "config.json").read_text())["max_abs_difference"]
    assert float(shown[1].rstrip(",")) == pytest.approx(recorded["encode_image"], rel=1e-2)
    assert float(shown[2]) == pytest.approx(recorded["encode_text"], rel=1e-2)
    assert max(recorded.values()) <= 1e-5
    model_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg == json.loads((out / "csm-student.json").read_text())
    assert model_cfg["vision_cfg"] == {"timm_model_name": "resnet18", "timm_model_pretrained": False,
                                       "timm_pool": "avg", "timm_proj": None, "timm_proj_bias": False,
                                       "image_size": SIZE}
    assert not list(out.glob("*.tmp"))


def test_model_card_and_config_name_the_teacher(exported, cache, distilled, tiny_teacher):
    out, _ = exported
    header = TeacherCache(cache).header
    identity = parse_identity(header.teacher_identity)
    description = json.loads((out / "config.json").read_text())
    assert description["teacher_identity"] == identity and identity["arch_kind"] == "two-tower"
    assert description["anchor_digest"] == header.prompt_digest
    assert (description["open_clip_model"], description["image_size"], description["embed_dim"]) == \
        ("csm-student", SIZE, 32)
    assert description["student"] == str(distilled("resnet18", "linear"))
    card = (out / "README.md").read_text()
    assert f"weights_sha256: `{identity['weights_sha256']}`" in card
    assert f"config: `{tiny_teacher[0].name}`" in card
    assert f"{TeacherCache(cache).num_images} images in 3 shards" in card
    assert "| head | `linear` |" in card and "| epochs | `1` |" in card
    assert 'create_model_and_transforms("local-dir:' in card


def test_the_model_card_has_the_probe_table_of_this_student(distilled, tiny_teacher, tmp_path):
    student = distilled("resnet18", "linear")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["probe"]["out"] = str(tmp_path / "probe.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "probe.json").write_text(json.dumps({"teacher": {"linear_top1": 0.5, "zeroshot_top1": 0.25},
                                                     "student": {"linear_top1": 0.375, "zeroshot_top5": 0.75}}))
    (tmp_path / "probe.config.json").write_text(json.dumps({"student": str(student)}))
    config, weights = tiny_teacher
    export.run(StudentFiles(student, params=tmp_path / "params.yaml"), tmp_path / "out", 0.1,
               TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config)), "open_clip")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| teacher | 50.0 | - | 25.0 | - |" in card and "| student | 37.5 | - | - | 75.0 |" in card
    # metrics of another student are not this one's
    (tmp_path / "probe.config.json").write_text(json.dumps({"student": str(tiny_teacher[1])}))
    export.run(StudentFiles(student, params=tmp_path / "params.yaml"), tmp_path / "out", 0.1,
               TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config)), "open_clip")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| teacher |" not in card and "No probe metrics of this student were found." in card


@pytest.mark.parametrize(("arch", "head", "proj"), [("resnet18", "clip-mlp", "mlp"),
                                                    ("timm/mobilenetv3_small_100", "linear", None)])
def test_clip_mlp_and_timm_students(distilled, tiny_teacher, tmp_path, arch, head, proj):
    config, weights = tiny_teacher
    result = export.run(StudentFiles(distilled(arch, head)), tmp_path, 0.1,
                        TeacherConfig(model="", pretrained="", checkpoint=str(weights), config=str(config)),
                        "open_clip")
    assert max(result["max_abs_difference"].values()) <= 1e-5
    vision = json.loads((tmp_path / "csm-student.json").read_text())["vision_cfg"]
    assert (vision["timm_model_name"], vision["timm_proj"], vision["timm_proj_bias"]) == \
        (arch.removeprefix("timm/"), proj, proj == "mlp")


def untrained_like(student: Path, arch: str, head: str, path: Path) -> Path:
    """`student`'s checkpoint (its run, cache and teacher) holding an untrained `arch` with `head`: what
    the refusals look at, without training it."""
    checkpoint = torch.load(student, weights_only=True)
    checkpoint["model"].update(arch=arch, head=head)
    checkpoint["state_dict"] = build_student(checkpoint["model"]).state_dict()
    torch.save(checkpoint, path)
    return path


def test_what_open_clip_cannot_hold_is_refused_in_one_line(distilled, tiny_teacher, tmp_path, capsys):
    from pipeline.__main__ import main

    def refused(student: Path, *options: str) -> str:
        code = main(["export", "--format", "open_clip", "--student", str(student), *options,
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert not (tmp_path / "out").exists()
        return err.strip()

    trained, tiny = distilled("resnet18", "linear"), teacher_options(tiny_teacher)
    err = refused(untrained_like(trained, "resnet18", "mlp", tmp_path / "mlp.pt"), *tiny)
    assert "--arch resnet18 --head mlp: open_clip has no Linear-BatchNorm-ReLU-Linear projection" in err
    assert "train with --head clip-mlp (or linear)" in err
    err = refused(untrained_like(trained, "timm/mobilenetv3_small_100", "clip-mlp", tmp_path / "mnv3.pt"), *tiny)
    assert "--arch timm/mobilenetv3_small_100 --head clip-mlp: open_clip's mlp projection takes timm's " \
           "num_features (576), but the student's head takes its 1024 pooled features" in err
    err = refused(untrained_like(trained, "mobilenet_v3_small", "linear", tmp_path / "tv.pt"), *tiny)
    assert "--arch mobilenet_v3_small --head linear: a torchvision model that open_clip cannot hold" in err
    assert "train with --arch timm/NAME" in err
    demo = ["--teacher-config", str(ROOT / "data/teachers/demo-msclip.json"),
            "--teacher-checkpoint", str(ROOT / "data/teachers/demo-msclip.safetensors")]
    err = refused(trained, *demo)
    assert "an ms-clip model, which open_clip cannot build" in err and "pipeline.small_clip.SmallCLIP" in err
    code = main(["export", "--format", "onnx", "--student", str(trained), "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err == \
        "error: option --format onnx: expected one of standalone, open_clip\n"


def test_docs_snippet_classifies_like_the_student_and_the_teacher(exported, distilled, teacher, tmp_path):
    snippet = readme_snippets()["open_clip"]  # the open_clip block of docs/using-the-student.md
    assert "pipeline" not in snippet and "stages" not in snippet
    (tmp_path / "zero_shot.py").write_text(snippet)
    files = []
    for seed in range(3):
        write_image(tmp_path / f"image_{seed}.jpg", seed=seed, size=(40 + 4 * seed, 32))
        files.append(tmp_path / f"image_{seed}.jpg")
    names = ["red heart", "blue star", "green triangle", "crane"]
    guard = "import runpy, sys; sys.modules['pipeline'] = sys.modules['stages'] = None; " \
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    result = run_offline(["-c", guard, str(tmp_path / "zero_shot.py"), str(exported[0]), ",".join(names),
                          *map(str, files)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(files)
    student, _ = load_student(distilled("resnet18", "linear"))
    text = teacher.encode_text([f"a photo of a {name}." for name in names])
    with torch.no_grad():
        images = student(torch.stack([eval_view(decode_rgb(p.read_bytes()), SIZE) for p in files]))
    probabilities = (teacher.model.logit_scale.exp() * images @ text.T).softmax(dim=-1)
    for path, line, row in zip(files, lines, probabilities, strict=True):
        shown, name = line.removeprefix(f"{path} ").split(" ", 1)
        assert name == names[int(row.argmax())], line
        assert float(shown) == pytest.approx(float(row.max()), abs=1e-3), line
