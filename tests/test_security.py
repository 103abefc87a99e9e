"""Security: checkpoints never run pickled code; shard member names cannot write outside a folder."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.student import load_student
from pipeline.teacher import read_state_dict
from pipeline.training import RunState
from stages import precompute
from tests.conftest import make_demo_shards, precompute_config


class Payload:
    """Unpickling this runs os.system: a checkpoint that would execute code if loaded unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker), "state_dict": {}, "fingerprint": Payload(marker)}, f)
    return path


def test_checkpoints_that_would_run_code_are_refused_in_one_line_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = malicious(tmp_path / "student.pt", marker)
    with pytest.raises(PipelineError, match=r"student.pt: not a student checkpoint \(.*\)$"):
        load_student(bad)
    with pytest.raises(PipelineError, match=r"last.pt: not a checkpoint of this run \(.*\); delete it to start over"):
        RunState(malicious(tmp_path / "last.pt", marker), "x").load(torch.nn.Linear(1, 1), None)
    with pytest.raises(PipelineError, match=r"teacher.pt: not a readable checkpoint .*--teacher-checkpoint"):
        read_state_dict(malicious(tmp_path / "teacher.pt", marker))
    assert not marker.exists()


def test_shard_member_names_with_dot_dot_cannot_write_outside(tmp_path, tiny_teacher):
    """A shard whose members are named ../../escape.jpg (a crafted or foreign shard) is read in
    memory: precompute runs over it and writes nothing outside its output folder."""
    shards = make_demo_shards(tmp_path / "work" / "shards", train=8, val=4, max_per_shard=8)
    evil = shards / "train-000001.tar"
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, format="JPEG")
    with tarfile.open(evil, "w") as tar:
        for name, data in (("../../escape.jpg", jpeg.getvalue()), ("../../escape.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "work" / "cache" / "teacher.h5"
    precompute.run(precompute_config(shards, out, tiny_teacher))
    created = set(tmp_path.rglob("*")) - before
    assert created and all(path.is_relative_to(out.parent) for path in created), created
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()
