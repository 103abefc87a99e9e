"""The training hot loop as a GPU would run it, checked on CPU: targets leave the workers as
stored and are widened on the device, the loss is read back every `sync_every` steps only,
DataLoader workers persist across epochs with the batch order of fresh ones, the fp16 loss
scaler steps and resumes, and `--compile` trains the same model it saves."""

from __future__ import annotations

import pytest
import torch

from pipeline import distributed, precision, training
from pipeline.cache import TeacherCache
from pipeline.shards import iter_shard, list_shards
from pipeline.student import build_student, load_student
from stages import distill, precompute
from tests.conftest import precompute_config
from tests.test_distill import distill_config


@pytest.fixture(scope="module")
def demo_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher))
    return out


@pytest.fixture(scope="module")
def topk_cache(demo_shards, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("topk") / "teacher.h5"
    precompute.run(precompute_config(demo_shards, out, tiny_teacher, topk=5, views=2))
    return out


def test_top_k_targets_ship_as_stored_and_widen_on_the_device_to_what_the_cache_expands(
        demo_shards, topk_cache, tiny_teacher, tmp_path):
    cache = TeacherCache(topk_cache)
    shard, epoch = 2, 1
    replay = training.ReplayViews(cache, 0, epoch, 32, with_targets=True)
    context = replay.context(shard)
    samples = [replay(s, context) for s in iter_shard(list_shards(demo_shards, "train")[shard], shard)]
    assert samples[0]["targets"].dtype == torch.float16 and samples[0]["targets"].shape == (5,)
    assert samples[0]["target_anchors"].dtype == torch.int32
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("targets", "target_anchors")}
    dense = training.dense_targets(batch, cache.header.num_anchors)["targets"]
    expanded = cache.shard_targets(shard, training.epoch_view(0, epoch, shard, 2))  # float32, -inf outside
    assert dense.dtype == torch.float32 and torch.equal(dense, torch.from_numpy(expanded.similarities))
    # what a worker ships per image: 32 px uint8 view, 3 int64 (position, label, shard), 5 x (fp16 + int32)
    config = distill_config(demo_shards, topk_cache, tiny_teacher, tmp_path)
    objective = distill.csm_objective(config, cache.header.embed_dim)
    assert training.batch_bytes(config.train, cache, objective) == 16 * (3 * 32 * 32 + 24 + 5 * (2 + 4))


def test_the_loss_is_read_back_every_sync_every_steps_and_at_the_epoch_end(demo_shards, demo_cache, tiny_teacher,
                                                                          tmp_path, monkeypatch):
    """A read waits for the device; steps between reads only queue work. 2 epochs x 6 steps,
    sync_every 4: reads after steps 4, 6 (the epoch end), 8, 12 (the epoch end; 12 is also a
    multiple of 4: one read)."""
    reads = []
    original = training.Sums.read

    def counted(self, state, since_step, lr):
        reads.append(state.global_step)
        return original(self, state, since_step, lr)

    monkeypatch.setattr(training.Sums, "read", counted)
    distill.run(distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path,
                               **{"train.epochs": 2, "train.sync_every": 4}))
    assert reads == [4, 6, 8, 12, 12]  # the last epoch's end reads once at step 12, then once closing it


def test_workers_persist_across_epochs_and_give_the_batches_fresh_workers_give(demo_shards, demo_cache,
                                                                              tiny_teacher, tmp_path):
    config = distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path, **{"train.workers": 2}).train
    cache = TeacherCache(demo_cache)
    objective = distill.csm_objective(distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path),
                                      cache.header.embed_dim)
    shards = list_shards(demo_shards, "train")

    def keys(loader, epoch, steps=6):
        batches = loader.epoch(epoch)
        taken = [b["keys"] for _, b in zip(range(steps), batches, strict=False)]
        batches.close()
        return taken

    persistent = training.TrainLoader(config, cache, objective, shards, distributed.Process(), torch.device("cpu"))
    first = keys(persistent, 0, steps=3)  # an epoch cut short, as at the step count
    workers = [w.pid for w in persistent.loader._iterator._workers]
    second, third = keys(persistent, 1), keys(persistent, 2, steps=8)  # 8 > 6 batches: a second lap
    assert [w.pid for w in persistent.loader._iterator._workers] == workers and len(workers) == 2
    persistent.close()
    for epoch, seen in ((0, first), (1, second), (2, third)):
        fresh = training.TrainLoader(config, cache, objective, shards, distributed.Process(), torch.device("cpu"))
        assert keys(fresh, epoch, steps=len(seen)) == seen, epoch
        fresh.close()


def test_the_fp16_loss_scaler_steps_and_its_scale_resumes(demo_shards, demo_cache, tiny_teacher, tmp_path):
    """fp16 with a GradScaler, as on a V100 or T4 (CPU autocast runs fp16 too, so the path runs here)."""
    cache = TeacherCache(demo_cache)
    objective = distill.csm_objective(distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path),
                                      cache.header.embed_dim)
    torch.manual_seed(0)
    model = build_student(objective.model_spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fp16 = precision.Precision("fp16", torch.float16, scaler=True, tf32=False)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10)
    shard = cache.shard_targets(0, 0)
    batch = {"keys": ["a"] * 8, "pixels": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
             "targets": torch.from_numpy(shard.similarities[:8]).half()}
    before = [p.detach().clone() for p in model.parameters()]
    terms = training.train_step(model, optimizer, objective, batch, cache.anchors(), torch.device("cpu"), fp16, scaler)
    assert torch.isfinite(terms["loss"]) and scaler.get_scale() == 2.0 ** 10
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    state = training.RunState(tmp_path / "last.pt", "f")
    state.save(model, optimizer, scaler)
    resumed = torch.amp.GradScaler("cpu", enabled=True)
    assert state.load(build_student(objective.model_spec), torch.optim.AdamW(model.parameters(), fused=True), resumed)
    assert resumed.get_scale() == 2.0 ** 10 and resumed.state_dict() == scaler.state_dict()


def test_compile_trains_and_saves_the_plain_model(demo_shards, demo_cache, tiny_teacher, tmp_path):
    # timm's smallest ResNet: inductor's compile time grows with the graph (ResNet-18: about a minute here)
    config = distill_config(demo_shards, demo_cache, tiny_teacher, tmp_path,
                            **{"train.epochs": 1, "train.compile": True, "train.arch": "timm/test_resnet"})
    metrics = distill.run(config)
    assert metrics["epochs"] == 1 and metrics["final_loss"] > 0
    model, checkpoint = load_student(tmp_path / "student.pt")  # a plain Student: no wrapper's key prefix
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert checkpoint["state_dict"].keys() == last.keys() == model.state_dict().keys()
