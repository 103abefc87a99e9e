"""`python -m pipeline bench`: the cost of caching, measured side by side in one run.

(a) plain student training: the same shards, decoding, view rendering, model and loss
    shape, against fixed targets (no teacher, no cache);
(b) cached CSM distillation: the real stage-two data path (shards + HDF5 targets);
(c) online CSM distillation: the teacher runs on every batch (no cache);
(d) the bare teacher forward on pre-decoded tensors, against precompute end to end;
(e) cache bytes per view, full float16 and top-k;
(f) peak RSS of distillation with the cache at 1x and at 8x its size (views replicated).
Every number comes from this run; the ratios are what to compare across machines.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import write_json
from pipeline.cache import TeacherCache, replicate_views
from pipeline.config import BenchConfig, PrecomputeConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.losses import csm_loss
from pipeline.prompts import anchor_embeddings
from pipeline.shards import MixedBatches, Sample, ShardBatches, iterate_batches, list_shards
from pipeline.student import build_student, student_on
from pipeline.teacher import Teacher, load_teacher, resolve_device
from pipeline.training import MIN_BATCH, Objective, ReplayViews, make_optimizer, train_step
from pipeline.views import apply_view, sample_view_params, view_rng
from stages import precompute

log = logging.getLogger(__name__)

CROP_SCALE, CROP_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


class FreshViews:
    """prepare for plain and online training: a random view per image, sampled on the fly."""

    def __init__(self, sizes: dict[str, int], seed: int = 0) -> None:
        self.sizes, self.seed = sizes, seed

    def __call__(self, sample: Sample, _: Any) -> dict[str, torch.Tensor]:
        _, height, width = sample.image.shape
        params = sample_view_params(view_rng(self.seed, sample.shard, sample.position), 1, width, height,
                                    CROP_SCALE, CROP_RATIO, True)[0]
        return {name: apply_view(sample.image, params, size) for name, size in self.sizes.items()}


def cycle_batches(make_dataset: Callable[[int], ShardBatches | MixedBatches],
                  workers: int) -> Generator[dict[str, Any], None, None]:
    """Batches epoch after epoch (skipping batches too small for BatchNorm)."""
    epoch = 0
    while True:
        for batch in iterate_batches(make_dataset(epoch), workers):
            if len(batch["keys"]) >= MIN_BATCH:
                yield batch
        epoch += 1


def timed(batches: Generator[dict[str, Any], None, None], step: Callable[[dict[str, Any]], None], warmup: int,
          steps: int) -> dict[str, float]:
    """Images per second over `steps` steps after `warmup` untimed ones (data loading included)."""
    for _ in range(warmup):
        step(next(batches))
    images, started = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        images += len(batch["keys"])
    seconds = time.perf_counter() - started
    batches.close()  # stops the DataLoader workers: none may run on during the next measurement
    return {"images_per_second": images / seconds, "seconds": seconds, "images": images}


def student_trainer(config: BenchConfig, out_dim: int, device: torch.device):
    """The student and optimiser of the train section, as distill builds them."""
    torch.manual_seed(0)
    model = build_student({"arch": config.train.arch, "out_dim": out_dim, "head": config.train.head,
                           "head_hidden": config.train.head_hidden, "normalize_output": True})
    model = student_on(model, device)
    model.train()
    return model, make_optimizer(model, config.train)


TAU = 0.05  # what a step costs does not depend on the temperatures


def csm(embeddings: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return csm_loss(batch["targets"], embeddings, batch["anchors"], TAU, TAU)


OBJECTIVE = Objective("bench", {}, csm, needs_targets=True, score_name="agreement")


ROUNDS = 2  # every measurement runs in two rounds, interleaved (a b c a b c): drift hits all alike


def measure_training(config: BenchConfig, cache: TeacherCache, teacher: Teacher,
                     device: torch.device) -> dict[str, dict[str, float]]:
    """(a), (b) and (c) in interleaved rounds of steps/ROUNDS timed steps each."""
    shards = list_shards(config.train.shards, "train")
    anchors = cache.anchors().to(device)

    # (a) plain: same shards, decode and view rendering; fixed targets of the same shape.
    plain_model, plain_optimizer = student_trainer(config, cache.header.embed_dim, device)
    fixed_targets = torch.randn(config.train.batch_size, cache.header.num_anchors)

    def plain_batches(round_: int):
        return cycle_batches(lambda e: ShardBatches(shards, config.train.batch_size, FreshViews(
            {"pixels": config.train.image_size}, e), order_seed=round_, epoch=e), config.train.workers)

    def plain_step(batch):
        batch["targets"] = fixed_targets[: len(batch["keys"])]
        train_step(plain_model, plain_optimizer, OBJECTIVE, batch, anchors, device, config.train.precision)

    # (b) cached: the stage-two data path, targets from the HDF5 cache.
    cached_model, cached_optimizer = student_trainer(config, cache.header.embed_dim, device)

    def cached_batches(round_: int):
        def dataset(epoch: int) -> MixedBatches:
            replay = ReplayViews(cache, 0, epoch, config.train.image_size, with_targets=True)
            return MixedBatches(shards, config.train.batch_size, replay, replay.context, seed=round_, epoch=epoch)
        return cycle_batches(dataset, config.train.workers)

    def cached_step(batch):
        train_step(cached_model, cached_optimizer, OBJECTIVE, batch, anchors, device, config.train.precision)

    # (c) online: the teacher encodes every view (its own resolution) before the student step.
    prompt_embeddings = teacher.encode_text(cache.prompts())
    prompt_classes = cache.prompt_classes()
    online_anchors = anchor_embeddings(prompt_embeddings.cpu(), prompt_classes, cache.header.num_classes,
                                       cache.header.anchor_mode).to(device)
    online_model, online_optimizer = student_trainer(config, teacher.embed_dim, device)

    def online_batches(round_: int):
        return cycle_batches(lambda e: ShardBatches(shards, config.train.batch_size, FreshViews(
            {"pixels": config.train.image_size, "teacher_pixels": teacher.image_size}, e), order_seed=round_, epoch=e),
            config.train.workers)

    def online_step(batch):
        batch["targets"] = (teacher.encode_image(batch["teacher_pixels"]) @ online_anchors.T).float()
        train_step(online_model, online_optimizer, OBJECTIVE, batch, online_anchors, device,
                   config.train.precision)

    kinds = {"plain": (plain_batches, plain_step), "cached": (cached_batches, cached_step),
             "online": (online_batches, online_step)}
    totals = {name: {"images": 0, "seconds": 0.0} for name in kinds}
    steps = max(1, config.steps // ROUNDS)
    for round_ in range(ROUNDS):
        for name, (batches, step) in kinds.items():
            result = timed(batches(round_), step, config.warmup_steps, steps)
            totals[name]["images"] += result["images"]
            totals[name]["seconds"] += result["seconds"]
    results = {name: {**t, "images_per_second": t["images"] / t["seconds"]} for name, t in totals.items()}
    for label, name in (("(a) plain training", "plain"), ("(b) cached distillation", "cached"),
                        ("(c) online distillation", "online")):
        log.info("%s: %.1f images/s", label, results[name]["images_per_second"])
    return results


def precompute_batch_size(config: BenchConfig) -> int:
    """Views per teacher forward in both (d) measurements: 64 images' views."""
    return 64 * config.views


def measure_teacher_forward(config: BenchConfig, teacher: Teacher) -> float:
    """(d) views/s of the bare teacher on pre-decoded tensors, at precompute's batch size."""
    batch = precompute_batch_size(config)
    views = torch.rand(batch, 3, teacher.image_size, teacher.image_size)
    teacher.encode_image(views)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    started, count = time.perf_counter(), 0
    while count < max(config.steps, 1) * batch // 2 or time.perf_counter() - started < 2:
        teacher.encode_image(views)
        count += len(views)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def subset_shards(shard_dir: str, count: int, work: Path) -> Path:
    """A shard directory with the first `count` train shards (links) and the classes file."""
    subset = work / "shards"
    subset.mkdir(parents=True)
    for shard in list_shards(shard_dir, "train")[:count]:
        (subset / shard.name).symlink_to(shard.resolve())
    shutil.copy(Path(shard_dir) / "classes.json", subset / "classes.json")
    return subset


def view_storage_bytes(path: Path) -> float:
    """Bytes per view of the per-view and per-image datasets (without the fixed prompt/anchor part)."""
    reader = TeacherCache(path)
    try:
        return reader.view_storage_bytes() / max(1, reader.num_views)
    finally:
        reader.close()


def measure_precompute(config: BenchConfig, work: Path) -> dict[str, Any]:
    """(d) precompute end to end and (e) bytes per view, on the first shards of the set."""
    subset = subset_shards(config.train.shards, config.precompute_shards, work)
    base = PrecomputeConfig(
        shards=str(subset), out="", views=config.views, crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO, flip=True,
        seed=0, topk=0, store_embeddings=False, batch_size=precompute_batch_size(config), workers=config.train.workers,
        device=config.train.device, precision="bf16", metrics="", teacher=config.teacher, prompts=config.prompts)
    results = {}
    for name, topk in (("full", 0), ("topk", config.topk)):
        out = work / f"{name}.h5"
        metrics = precompute.run(dataclasses.replace(base, out=str(out), topk=topk,
                                                     metrics=str(work / f"{name}.json")),
                                 allow_random_teacher=config.random_teacher)
        results[name] = {"views_per_second": metrics["views_per_second"],
                         "images_per_second": metrics["images_per_second"],
                         "bytes_per_view_file": metrics["bytes_per_view"],
                         "bytes_per_view": view_storage_bytes(out)}
    return results


def rss_child(config: BenchConfig, cache_path: str, queue: multiprocessing.Queue) -> None:
    """Runs cached distillation steps in a fresh process; reports its peak RSS and its workers'."""
    device = resolve_device(config.train.device)
    cache = TeacherCache(cache_path)
    shards = list_shards(config.train.shards, "train")
    model, optimizer = student_trainer(config, cache.header.embed_dim, device)
    anchors = cache.anchors().to(device)

    def dataset(epoch: int) -> MixedBatches:
        replay = ReplayViews(cache, 0, epoch, config.train.image_size, with_targets=True)
        return MixedBatches(shards, config.train.batch_size, replay, replay.context, seed=0, epoch=epoch)

    timed(cycle_batches(dataset, config.train.workers),
          lambda b: train_step(model, optimizer, OBJECTIVE, b, anchors, device, config.train.precision), 0,
          config.warmup_steps + config.steps)
    main_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    queue.put({"main_mib": main_kib / 1024, "worker_mib": workers_kib / 1024})


def bytes_read_by_this_process() -> int | None:
    """Bytes this process has asked the kernel to read so far (`rchar` of /proc/self/io; None elsewhere)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def target_read_ratio(cache_path: str | Path, epochs: int = 2) -> float | None:
    """(g) Bytes read from the cache per byte of the rows stage two uses, over `epochs` epochs.

    Every shard's targets are read as distill reads them (`ReplayViews.context`), after one
    epoch that opens every part file (opening one reads about 70 KB of HDF5 metadata, once
    per process); the used bytes are the stored size of the rows of the views taken plus each
    image's position and label. 1.0 means nothing is read that is not used.
    """
    cache = TeacherCache(cache_path)
    row_bytes = cache.view_row_bytes() + 8  # one view's stored row, and the image's position and label

    def read_epoch(epoch: int) -> int:
        replay = ReplayViews(cache, 0, epoch, 32, with_targets=True)
        for shard in range(len(cache.shard_names)):
            replay.context(shard)
        return cache.num_images * row_bytes

    read_epoch(epochs)  # opens the files
    before = bytes_read_by_this_process()
    if before is None:
        return None
    used = sum(read_epoch(epoch) for epoch in range(epochs))
    read = bytes_read_by_this_process() - before
    cache.close()
    return read / max(1, used)


def measure_rss(config: BenchConfig, work: Path) -> dict[str, Any]:
    """(f) peak RSS of cached distillation with the cache at 1x and 8x (each in a fresh process),
    and (g) the bytes each reads from the cache per byte it uses."""
    big = work / "cache8x.h5"
    replicate_views(Path(config.train.cache), big, 8)
    results = {}
    context = multiprocessing.get_context("spawn")
    for name, path in (("1x", config.train.cache), ("8x", str(big))):
        queue = context.Queue()
        child = context.Process(target=rss_child, args=(config, path, queue))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise PipelineError(f"bench: the RSS measurement with the {name} cache failed")
        peak = queue.get()
        peak["total_mib"] = peak["main_mib"] + peak["worker_mib"] * max(1, config.train.workers)
        peak["cache_bytes"] = TeacherCache(path).stored_bytes()
        peak["read_per_used"] = target_read_ratio(path)
        results[name] = peak
    return results


def run(config: BenchConfig) -> dict[str, Any]:
    if config.steps < 1 or config.train.batch_size < 2:
        raise PipelineError("options --steps must be >= 1 and --batch-size >= 2")
    device = resolve_device(config.train.device)
    cache = TeacherCache(config.train.cache)
    cache.require(shards=list_shards(config.train.shards, "train"))
    teacher = load_teacher(config.teacher, config.train.device, allow_random=config.random_teacher)
    started = time.perf_counter()
    training = measure_training(config, cache, teacher, device)
    with tempfile.TemporaryDirectory(prefix="csm-bench-") as tmp:
        work = Path(tmp)
        # The bare teacher is timed right before and right after precompute: their mean is
        # what precompute is compared with, so a drifting machine does not skew the ratio.
        before = measure_teacher_forward(config, teacher)
        storage = measure_precompute(config, work / "precompute")
        after = measure_teacher_forward(config, teacher)
        teacher_views_per_second = (before + after) / 2
        rss = measure_rss(config, work) if config.measure_rss else {}
    result = {
        "device": str(device),
        "teacher": teacher.identity,
        "teacher_image_size": teacher.image_size,
        "student": f"{config.train.arch}@{config.train.image_size}px",
        "batch_size": config.train.batch_size,
        "steps": config.steps,
        "plain_images_per_second": training["plain"]["images_per_second"],
        "cached_images_per_second": training["cached"]["images_per_second"],
        "online_images_per_second": training["online"]["images_per_second"],
        "teacher_views_per_second": teacher_views_per_second,
        "teacher_views_per_second_before_after": [before, after],
        "precompute_views_per_second": storage["full"]["views_per_second"],
        "cached_over_plain": training["cached"]["images_per_second"] / training["plain"]["images_per_second"],
        "online_over_cached_time": training["cached"]["images_per_second"]
        / training["online"]["images_per_second"],
        "precompute_over_teacher": storage["full"]["views_per_second"] / teacher_views_per_second,
        "bytes_per_view_full": storage["full"]["bytes_per_view"],
        "bytes_per_view_topk": storage["topk"]["bytes_per_view"],
        "bytes_per_view_full_file": storage["full"]["bytes_per_view_file"],
        "bytes_per_view_topk_file": storage["topk"]["bytes_per_view_file"],
        "topk": config.topk,
        "seconds": 0.0,
    }
    if rss:
        result.update({
            "peak_rss_mib_1x": rss["1x"]["total_mib"],
            "peak_rss_mib_8x": rss["8x"]["total_mib"],
            "rss_growth_8x": rss["8x"]["total_mib"] / rss["1x"]["total_mib"] - 1,
            "cache_bytes_1x": rss["1x"]["cache_bytes"],
            "cache_bytes_8x": rss["8x"]["cache_bytes"],
            "read_per_used_byte_1x": rss["1x"]["read_per_used"],
            "read_per_used_byte_8x": rss["8x"]["read_per_used"],
        })
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    if config.json:
        write_json(config.json, result)
        write_resolved(config, Path(config.json).with_suffix(".config.json"))
    return result


def print_table(r: dict[str, Any]) -> None:
    print()
    print(f"bench on {r['device']}: student {r['student']}, batch {r['batch_size']}, {r['steps']} timed steps")
    print(f"teacher {r['teacher']} ({r['teacher_image_size']}px)")
    rows = [
        ("(a) plain training", f"{r['plain_images_per_second']:.1f} img/s"),
        ("(b) cached CSM distillation", f"{r['cached_images_per_second']:.1f} img/s"),
        ("(c) online CSM distillation", f"{r['online_images_per_second']:.1f} img/s"),
        ("(d) bare teacher forward", f"{r['teacher_views_per_second']:.1f} views/s"),
        ("(d) precompute end to end", f"{r['precompute_views_per_second']:.1f} views/s"),
        ("(e) cache bytes/view, full fp16", f"{r['bytes_per_view_full']:.1f} B ({r['bytes_per_view_full_file']:.1f} B "
                                            "with prompts/anchors)"),
        (f"(e) cache bytes/view, top-{r['topk']}", f"{r['bytes_per_view_topk']:.1f} B "
                                                  f"({r['bytes_per_view_topk_file']:.1f} B with prompts/anchors)"),
    ]
    if "rss_growth_8x" in r:
        rows.append(("(f) peak RSS, cache 1x / 8x", f"{r['peak_rss_mib_1x']:.0f} / {r['peak_rss_mib_8x']:.0f} MiB"))
    if r.get("read_per_used_byte_1x") is not None:
        rows.append(("(g) cache bytes read / used, 1x / 8x",
                     f"{r['read_per_used_byte_1x']:.3f} / {r['read_per_used_byte_8x']:.3f}"))
    for label, value in rows:
        print(f"  {label:<34} {value}")
    print("ratios:")
    print(f"  cached_over_plain        {r['cached_over_plain']:.3f}   (b / a)")
    print(f"  online_over_cached_time  {r['online_over_cached_time']:.3f}   (epoch time of c / b)")
    print(f"  precompute_over_teacher  {r['precompute_over_teacher']:.3f}   (precompute / bare teacher, views/s)")
    if "rss_growth_8x" in r:
        print(f"  rss_growth_8x            {r['rss_growth_8x']:.3f}   (peak RSS 8x / 1x - 1)")
    print()
