"""Stage one on a GPU node, checked on a CPU: the shared-memory budget of its ranks, the precision
and device a partial run is resumed with, and the part files written behind the teacher."""

from __future__ import annotations

import errno
import json
import logging
import threading
from pathlib import Path

import h5py
import pytest
import torch

from pipeline import atomic, cache
from pipeline.errors import PipelineError
from pipeline.shards import ShardBatches, list_shards
from pipeline.teacher import effective_precision, load_teacher
from stages import precompute
from tests.conftest import precompute_config
from tests.test_precompute import assert_same_file

OTHER_GPU = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tiny_teacher, tmp_path_factory) -> Path:
    """A cache made in one run with the test settings (bf16, this CPU)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out


def partial_run(demo_shards, tiny_teacher, out: Path, **changes) -> None:
    """What a run killed after its second shard leaves: two parts and the state, no cache file."""
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, **changes))
    out.unlink()
    cache.part_path(out, 2).unlink()


def part_names(out: Path) -> list[str]:
    return sorted(p.name for p in cache.parts_dir(out).glob("part-*"))


def test_a_shared_memory_budget_the_node_cannot_hold_is_refused_before_any_part(demo_shards, tiny_teacher,
                                                                                 tmp_path, monkeypatch):
    """Every local rank's workers share /dev/shm: a node of more processes than it can hold is
    refused in one line naming the options and the process count, before a view is rendered."""
    processes = 100_000_000  # x 2 workers x 2 batches x 0.2 MB: more than any /dev/shm
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    out = tmp_path / "teacher.h5"
    with pytest.raises(PipelineError) as error:
        precompute.run(precompute_config(demo_shards, out, tiny_teacher, workers=2))
    message = str(error.value)
    assert "\n" not in message and message.startswith("options --workers 2 --batch-size 64: the prefetched batches")
    assert f"({processes} processes on this machine), /dev/shm has" in message
    assert not out.exists() and part_names(out) == []


def test_the_shared_memory_of_a_batch_is_what_a_worker_ships(demo_shards, tiny_teacher):
    """`batch_bytes` against a real batch of the stage's dataset: every tensor it ships."""
    config = precompute_config(demo_shards, Path("unused.h5"), tiny_teacher, views=3, batch_size=20)
    size = load_teacher(config.teacher, "cpu").image_size
    dataset = ShardBatches(list_shards(demo_shards, "train"), precompute.images_per_batch(config),
                           precompute.ViewRenderer(config, size))
    batch = next(iter(dataset))
    shipped = sum(value.nbytes for value in batch.values() if isinstance(value, torch.Tensor))
    assert len(batch["keys"]) == 6 and batch["views"].dtype == torch.uint8
    assert precompute.precompute_batch_bytes(6, 3, size) == shipped


def test_a_partial_run_resumed_at_another_precision_is_refused_when_it_computes_otherwise(demo_shards, tiny_teacher,
                                                                                          tmp_path):
    """bf16 and fp32 differ where bf16 is native (this CPU, if it has AVX512-BF16 or AMX); where it
    is not, both run fp32 and the partial run is the same computation: it is resumed."""
    out = tmp_path / "teacher.h5"
    partial_run(demo_shards, tiny_teacher, out, precision="bf16")
    cpu = torch.device("cpu")
    before, now = effective_precision(cpu, "bf16"), effective_precision(cpu, "fp32")
    resumed = precompute_config(demo_shards, out, tiny_teacher, precision="fp32")
    if before != now:
        with pytest.raises(PipelineError) as error:
            precompute.run(resumed)
        parts = cache.parts_dir(out)
        assert str(error.value) == (f"{parts}: a partial run with other settings (teacher: precision: partial run "
                                    f"{before}, this run {now}); delete {parts} to start over, or run with the "
                                    f"same settings")
        assert part_names(out) == ["part-000000.h5", "part-000001.h5"] and not out.exists()
    else:
        precompute.run(resumed)
        clean = tmp_path / "clean" / "teacher.h5"
        precompute.run(precompute_config(demo_shards, clean, tiny_teacher, precision="fp32"))
        assert_same_file(clean, out)


def test_a_partial_run_resumed_on_another_device_is_kept_with_a_warning(demo_shards, tiny_teacher, uninterrupted,
                                                                        tmp_path, caplog):
    out = tmp_path / "teacher.h5"
    partial_run(demo_shards, tiny_teacher, out)
    state_path = cache.parts_dir(out) / "state.json"
    state = json.loads(state_path.read_text())
    assert state["header"]["teacher_device"] == "cpu"
    state["header"]["teacher_device"] = OTHER_GPU  # as if the partial run had been on a GPU of another model
    state_path.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="stages.precompute"):
        metrics = precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{cache.parts_dir(out)}: the partial run ran on {OTHER_GPU}, this run on cpu; its parts "
                        f"are kept (same settings and precision: the outputs differ in rounding at most)"]
    assert metrics["images_this_run"] == 32  # the one shard left
    assert_same_file(uninterrupted, out)  # the cache records this run's device: cpu
    assert json.loads(state_path.read_text())["header"]["teacher_device"] == "cpu"


def test_the_device_informs_and_is_never_checked(demo_shards, tiny_teacher, uninterrupted):
    """A cache made on another GPU, or before the device was recorded, fits the same params."""
    made = cache.TeacherCache(uninterrupted).header
    assert made.teacher_device == "cpu"
    teacher = load_teacher(precompute_config(demo_shards, uninterrupted, tiny_teacher).teacher, "cpu")
    shards = list_shards(demo_shards, "train")
    try:
        for device in (OTHER_GPU, None):  # None: an older cache, without the attribute
            with h5py.File(uninterrupted, "r+") as f:
                if device is None:
                    del f.attrs["teacher_device"]
                else:
                    f.attrs["teacher_device"] = device
                written = set(f.attrs)
            reader = cache.TeacherCache(uninterrupted)
            assert reader.header.teacher_device == (device or "")
            assert set(reader.header.to_attrs()) == written  # an older header gives back what it was written with
            assert settings(reader.header) == settings(made)
            reader.require(teacher_identity=teacher.identity, prompt_digest=made.prompt_digest, shards=shards)
    finally:
        with h5py.File(uninterrupted, "r+") as f:
            f.attrs["teacher_device"] = "cpu"  # as made, for the module's other tests


def settings(header: cache.CacheHeader) -> dict:
    return {k: v for k, v in header.to_attrs().items() if k not in cache.CacheHeader.INFORMATIONAL}


def test_a_failed_part_write_is_the_stages_one_line_error_and_a_rerun_completes(demo_shards, tiny_teacher,
                                                                                uninterrupted, tmp_path,
                                                                                monkeypatch):
    """The parts are written on a background thread: its failure (here a full disk at shard 1's
    fsync-and-rename) is raised by the stage as before, and leaves nothing of that shard."""
    out = tmp_path / "teacher.h5"
    commit = atomic.commit

    def full_disk_at_shard_1(tmp, path):
        if Path(path) == cache.part_path(out, 1):
            raise OSError(errno.ENOSPC, "No space left on device")
        commit(tmp, path)

    monkeypatch.setattr(atomic, "commit", full_disk_at_shard_1)
    with pytest.raises(PipelineError) as error:
        precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{cache.part_path(out, 1)}: could not be written (")
    assert "disk is full" in message
    assert "part-000000.h5" in part_names(out)  # the shard before it is kept
    assert not any(name.startswith("part-000001") for name in part_names(out)) and not out.exists()
    monkeypatch.setattr(atomic, "commit", commit)
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    assert_same_file(uninterrupted, out)


class GatedWriter(precompute.PartWriter):
    """A PartWriter whose writes wait for `gate` and fail for shard `failing`: the bookkeeping alone."""

    def __init__(self, failing: int = -1) -> None:
        super().__init__(Path("unused.h5"), None)
        self.gate, self.failing, self.done = threading.Event(), failing, []

    def __exit__(self, *exc: object) -> None:
        self.gate.set()  # a failed assertion must not leave the shutdown waiting for the gate
        super().__exit__(*exc)

    def write(self, shard: int, buffer: dict) -> None:
        self.gate.wait(timeout=30)
        if shard == self.failing:
            raise PipelineError(f"part {shard}: could not be written")
        self.done.append(shard)


def test_the_writer_holds_at_most_two_parts_and_the_teacher_waits_for_it():
    with GatedWriter() as writer:
        writer.submit(0, {})
        writer.submit(1, {})  # both pending: the teacher goes on
        third = threading.Thread(target=writer.submit, args=(2, {}))
        third.start()
        third.join(timeout=0.5)
        assert third.is_alive() and writer.done == []  # waits for the writer, holding no third part
        writer.gate.set()
        third.join(timeout=30)
        writer.finish()
        assert writer.done == [0, 1, 2] and not writer.pending


@pytest.mark.parametrize("raised_by", ["submit", "finish"])
def test_a_writer_failure_is_raised_by_the_next_submit_or_by_finish(raised_by):
    with GatedWriter(failing=0) as writer:
        writer.gate.set()
        writer.submit(0, {})
        writer.pending[0].exception(timeout=30)  # the write has failed
        with pytest.raises(PipelineError, match="^part 0: could not be written$"):
            writer.submit(1, {}) if raised_by == "submit" else writer.finish()
    assert writer.done == [] and not writer.pending  # after a failure, no further part is queued
