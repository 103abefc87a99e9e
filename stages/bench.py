"""`python -m pipeline bench`: the cost of caching, measured side by side in one run.

(a) plain student training: the same shards, decoding, view rendering, model and loss
    shape, against fixed targets (no teacher, no cache);
(b) cached CSM distillation: the real stage-two data path (shards + HDF5 targets);
(c) online CSM distillation: the teacher runs on every batch (no cache);
(c') the student's pure compute: (b)'s step on one batch of (b) held in memory on the device,
    no data loading at all; (b) / (c') is what the data path costs end to end;
(d) the bare teacher (normalisation and forward) on uint8 views already on its device, against
    precompute end to end;
(e) cache bytes per view, full float16 and top-k;
(f) peak RSS of distillation with the cache at 1x and at 8x its size (views replicated).
Every number comes from this run; the ratios are what to compare across machines.

What is timed is what runs on the device: every timed window waits for the device's queue
(`synchronize`) before it reads the clock, at both ends; the three training measurements
load their data with distill's loader settings (workers, prefetch, pinned memory on CUDA,
shard mixing; (b) through distill's own `TrainLoader`). The bench runs in one process:
under torchrun, rank 0 measures on its own device and the other ranks return at once.
"""

from __future__ import annotations

import dataclasses
import itertools
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

from pipeline import datapath, distributed, precision
from pipeline.atomic import write_json
from pipeline.cache import TeacherCache, replicate_views
from pipeline.config import BenchConfig, PrecomputeConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.losses import csm_loss
from pipeline.prompts import anchor_embeddings
from pipeline.shards import MixedBatches, Sample, SharedPosition, list_shards, loader_batches, make_loader
from pipeline.student import build_student, student_on
from pipeline.teacher import Teacher, load_teacher, resolve_device
from pipeline.training import MIN_BATCH, Objective, ReplayViews, TrainLoader, make_optimizer, to_device, train_step
from pipeline.views import apply_view, sample_view_params, view_rng
from stages import precompute

log = logging.getLogger(__name__)

CROP_SCALE, CROP_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)
ONE_PROCESS = distributed.Process()  # what every measurement runs as: rank 0 of 1


class FreshViews:
    """prepare for plain and online training: a random view per image, sampled on the fly."""

    def __init__(self, sizes: dict[str, int], seed: int = 0) -> None:
        self.sizes, self.seed = sizes, seed

    def __call__(self, sample: Sample, _: Any) -> dict[str, torch.Tensor]:
        _, height, width = sample.image.shape
        params = sample_view_params(view_rng(self.seed, sample.shard, sample.position), 1, width, height,
                                    CROP_SCALE, CROP_RATIO, True)[0]
        return {name: apply_view(sample.image, params, size) for name, size in self.sizes.items()}


def fresh_view_batches(config: BenchConfig, shards: list[Path], sizes: dict[str, int], round_: int,
                       device: torch.device) -> Generator[dict[str, Any], None, None]:
    """(a) and (c)'s batches, endlessly: distill's loader and shard mixing (`TrainLoader`'s
    settings), with a fresh random view per image instead of a cached one."""
    train = config.train
    position = SharedPosition(round_)
    dataset = MixedBatches(shards, train.batch_size, FreshViews(sizes, round_), None, seed=train.seed,
                           epoch=position, mix=train.mix_shards)
    loader = make_loader(dataset, train.workers, pin_memory=device.type == "cuda", prefetch=train.prefetch,
                         persistent=True)
    for lap in itertools.count():
        position.move_to(round_, lap)
        yield from (batch for batch in loader_batches(loader) if len(batch["keys"]) >= MIN_BATCH)


def cached_batches(config: BenchConfig, cache: TeacherCache, shards: list[Path], round_: int,
                   device: torch.device) -> Generator[dict[str, Any], None, None]:
    """(b)'s batches, endlessly: distill's own loader (`TrainLoader`) at epoch `round_`."""
    loader = TrainLoader(config.train, cache, OBJECTIVE, shards, ONE_PROCESS, device)
    try:
        yield from loader.epoch(round_)
    finally:
        loader.close()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs kernels asynchronously: the clock read
    right after a step would miss its kernels); a no-op on a CPU, whose work is done on return."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches: Generator[dict[str, Any], None, None], step: Callable[[dict[str, Any]], None], warmup: int,
          steps: int, device: torch.device) -> dict[str, float]:
    """Images per second over `steps` steps after `warmup` untimed ones (data loading included),
    the device's queue drained at both ends of the window."""
    for _ in range(warmup):
        step(next(batches))
    synchronize(device)  # the warm-up's kernels are not the window's
    images, started = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        images += len(batch["keys"])
    synchronize(device)
    seconds = time.perf_counter() - started
    batches.close()  # stops the DataLoader workers: none may run on during the next measurement
    return {"images_per_second": images / seconds, "seconds": seconds, "images": images}


def student_trainer(config: BenchConfig, out_dim: int, anchors: torch.Tensor,
                    device: torch.device) -> Callable[[dict[str, Any]], dict[str, torch.Tensor]]:
    """A training step of the train section's student and optimiser, as distill builds and
    steps them (its precision choice and, for fp16, its loss scaler)."""
    torch.manual_seed(0)
    model = build_student({"arch": config.train.arch, "out_dim": out_dim, "head": config.train.head,
                           "head_hidden": config.train.head_hidden, "normalize_output": True})
    model = student_on(model, device)
    model.train()
    optimizer = make_optimizer(model, config.train)
    chosen = precision.for_device(config.train.precision, device)
    scaler = precision.grad_scaler(chosen, device)
    return lambda batch: train_step(model, optimizer, OBJECTIVE, batch, anchors, device, chosen, scaler)


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
    plain_train = student_trainer(config, cache.header.embed_dim, anchors, device)
    fixed_targets = torch.randn(config.train.batch_size, cache.header.num_anchors)

    def plain_batches(round_: int):
        return fresh_view_batches(config, shards, {"pixels": config.train.image_size}, round_, device)

    def plain_step(batch):
        batch["targets"] = fixed_targets[: len(batch["keys"])]
        plain_train(batch)

    # (b) cached: the stage-two data path, targets from the HDF5 cache.
    cached_step = student_trainer(config, cache.header.embed_dim, anchors, device)

    # (c) online: the teacher encodes every view (its own resolution) before the student step.
    prompt_embeddings = teacher.encode_text(cache.prompts())
    prompt_classes = cache.prompt_classes()
    online_anchors = anchor_embeddings(prompt_embeddings.cpu(), prompt_classes, cache.header.num_classes,
                                       cache.header.anchor_mode).to(device)
    online_train = student_trainer(config, teacher.embed_dim, online_anchors, device)

    def online_batches(round_: int):
        return fresh_view_batches(config, shards, {"pixels": config.train.image_size,
                                                   "teacher_pixels": teacher.image_size}, round_, device)

    def online_step(batch):
        batch["targets"] = (teacher.encode_image(batch["teacher_pixels"]) @ online_anchors.T).float()
        online_train(batch)

    # (c') compute: (b)'s step on one of (b)'s batches, already on the device, again and again.
    compute_step = student_trainer(config, cache.header.embed_dim, anchors, device)
    first = cached_batches(config, cache, shards, 0, device)
    resident = to_device(next(first), device)
    first.close()  # its loader's workers stop

    def compute_batches(_: int):
        yield from itertools.repeat(resident)

    kinds = {"plain": (plain_batches, plain_step),
             "cached": (lambda round_: cached_batches(config, cache, shards, round_, device), cached_step),
             "online": (online_batches, online_step),
             "compute": (compute_batches, compute_step)}
    totals = {name: {"images": 0, "seconds": 0.0} for name in kinds}
    steps = max(1, config.steps // ROUNDS)
    for round_ in range(ROUNDS):
        for name, (batches, step) in kinds.items():
            result = timed(batches(round_), step, config.warmup_steps, steps, device)
            totals[name]["images"] += result["images"]
            totals[name]["seconds"] += result["seconds"]
    results = {name: {**t, "images_per_second": t["images"] / t["seconds"]} for name, t in totals.items()}
    for label, name in (("(a) plain training", "plain"), ("(b) cached distillation", "cached"),
                        ("(c) online distillation", "online"), ("(c') student compute", "compute")):
        log.info("%s: %.1f images/s", label, results[name]["images_per_second"])
    return results


def precompute_batch_size(config: BenchConfig) -> int:
    """Views per teacher forward in both (d) measurements: 64 images' views."""
    return 64 * config.views


def measure_teacher_forward(config: BenchConfig, teacher: Teacher) -> float:
    """(d) views/s of the bare teacher at precompute's batch size: its own normalisation and
    forward on uint8 views already on its device, made once before the window (precompute's
    views are uint8 too; a float32 host copy in the window would be work precompute never does)."""
    batch = precompute_batch_size(config)
    views = torch.randint(0, 256, (batch, 3, teacher.image_size, teacher.image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(teacher.device)
    teacher.encode_image(views)
    synchronize(teacher.device)
    started, count = time.perf_counter(), 0
    while count < max(config.steps, 1) * batch // 2 or time.perf_counter() - started < 2:
        teacher.encode_image(views)
        count += len(views)
    synchronize(teacher.device)
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


def precompute_here(config: PrecomputeConfig, device: torch.device, allow_random_teacher: bool) -> dict[str, Any]:
    """precompute in this process alone, on `device`: under torchrun, `precompute.run` would join
    the process group and wait there for the other ranks, which have returned."""
    precompute.check_options(config)
    return precompute.run_process(config, ONE_PROCESS, device, allow_random_teacher)


def measure_precompute(config: BenchConfig, work: Path, device: torch.device) -> dict[str, Any]:
    """(d) precompute end to end and (e) bytes per view, on the first shards of the set."""
    subset = subset_shards(config.train.shards, config.precompute_shards, work)
    base = PrecomputeConfig(
        shards=str(subset), out="", views=config.views, crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO, flip=True,
        seed=0, topk=0, store_embeddings=False, batch_size=precompute_batch_size(config), workers=config.train.workers,
        device=str(device), precision="bf16", metrics="", teacher=config.teacher, prompts=config.prompts,
        decode=config.train.decode)
    results = {}
    for name, topk in (("full", 0), ("topk", config.topk)):
        out = work / f"{name}.h5"
        metrics = precompute_here(dataclasses.replace(base, out=str(out), topk=topk,
                                                      metrics=str(work / f"{name}.json")),
                                  device, allow_random_teacher=config.random_teacher)
        results[name] = {"views_per_second": metrics["views_per_second"],
                         "images_per_second": metrics["images_per_second"],
                         "bytes_per_view_file": metrics["bytes_per_view"],
                         "bytes_per_view": view_storage_bytes(out)}
    return results


def rss_child(config: BenchConfig, cache_path: str, device_name: str, queue: multiprocessing.Queue) -> None:
    """Runs cached distillation steps in a fresh process; reports its peak RSS and its workers'."""
    device = torch.device(device_name)
    precision.configure(precision.for_device(config.train.precision, device), training=True,
                        deterministic=config.train.deterministic)
    cache = TeacherCache(cache_path)
    shards = list_shards(config.train.shards, "train")
    step = student_trainer(config, cache.header.embed_dim, cache.anchors().to(device), device)
    timed(cached_batches(config, cache, shards, 0, device), step, 0, config.warmup_steps + config.steps, device)
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


def measure_rss(config: BenchConfig, work: Path, device: torch.device) -> dict[str, Any]:
    """(f) peak RSS of cached distillation with the cache at 1x and 8x (each in a fresh process),
    and (g) the bytes each reads from the cache per byte it uses."""
    big = work / "cache8x.h5"
    replicate_views(Path(config.train.cache), big, 8)
    results = {}
    context = multiprocessing.get_context("spawn")
    for name, path in (("1x", config.train.cache), ("8x", str(big))):
        queue = context.Queue()
        child = context.Process(target=rss_child, args=(config, path, str(device), queue))
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
    """The bench; under torchrun on rank 0 only (the other ranks return an empty dict)."""
    process = distributed.single_process_stage("bench")
    if process is None:
        return {}
    if config.steps < 1 or config.train.batch_size < 2:
        raise PipelineError("options --steps must be >= 1 and --batch-size >= 2")
    device = distributed.local_device(resolve_device(config.train.device), process)
    # the process-wide switches distill sets (TF32, cuDNN autotuning, deterministic kernels)
    precision.configure(precision.for_device(config.train.precision, device), training=True,
                        deterministic=config.train.deterministic)
    cache = TeacherCache(config.train.cache)
    cache.require(shards=list_shards(config.train.shards, "train"))
    teacher = load_teacher(config.teacher, str(device), allow_random=config.random_teacher)
    started = time.perf_counter()
    training = measure_training(config, cache, teacher, device)
    with tempfile.TemporaryDirectory(prefix="csm-bench-") as tmp:
        work = Path(tmp)
        # The bare teacher is timed right before and right after precompute: their mean is
        # what precompute is compared with, so a drifting machine does not skew the ratio.
        before = measure_teacher_forward(config, teacher)
        storage = measure_precompute(config, work / "precompute", device)
        after = measure_teacher_forward(config, teacher)
        teacher_views_per_second = (before + after) / 2
        rss = measure_rss(config, work, device) if config.measure_rss else {}
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
        "compute_images_per_second": training["compute"]["images_per_second"],
        "teacher_views_per_second": teacher_views_per_second,
        "teacher_views_per_second_before_after": [before, after],
        "precompute_views_per_second": storage["full"]["views_per_second"],
        "cached_over_plain": training["cached"]["images_per_second"] / training["plain"]["images_per_second"],
        "cached_over_compute": training["cached"]["images_per_second"] / training["compute"]["images_per_second"],
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
    if config.data_path_images:
        result["data_path"] = measure_data_path(config)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    if config.json:
        write_json(config.json, result)
        write_resolved(config, Path(config.json).with_suffix(".config.json"))
    return result


def measure_data_path(config: BenchConfig) -> dict[str, Any]:
    """The data path alone, per core (pipeline/datapath.py): full-size ImageNet-like JPEGs, then
    each pre-sized longer side; precompute's reader at the views and resolution of `--views` and
    `--data-path-size`, distill's at one view."""
    log.info("data path: %d ImageNet-sized JPEGs, one thread, no model", config.data_path_images)
    try:
        sides = [int(side) for side in config.data_path_max_sides.split(",") if side.strip()]
    except ValueError:
        raise PipelineError(f"option --data-path-max-sides {config.data_path_max_sides}: expected whole numbers "
                            f"separated by commas, e.g. 256,320,512") from None
    sizes = {"full": 0, **{f"max_side_{side}": side for side in sides}}
    measured = {name: datapath.measure(config.data_path_images, config.data_path_size, config.data_path_size,
                                       config.views, config.train.batch_size, side)
                for name, side in sizes.items()}
    full = measured["full"]["ms_per_image"]["decode"]
    for name in sizes:
        if name != "full":  # how much faster a pre-sized JPEG decodes, in this run
            measured[name]["decode_speedup"] = full / measured[name]["ms_per_image"]["decode"]
    return measured


def print_table(r: dict[str, Any]) -> None:
    print()
    print(f"bench on {r['device']}: student {r['student']}, batch {r['batch_size']}, {r['steps']} timed steps")
    print(f"teacher {r['teacher']} ({r['teacher_image_size']}px)")
    rows = [
        ("(a) plain training", f"{r['plain_images_per_second']:.1f} img/s"),
        ("(b) cached CSM distillation", f"{r['cached_images_per_second']:.1f} img/s"),
        ("(c) online CSM distillation", f"{r['online_images_per_second']:.1f} img/s"),
        ("(c') student compute, batch in memory", f"{r['compute_images_per_second']:.1f} img/s"),
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
    print(f"  cached_over_compute      {r['cached_over_compute']:.3f}   (b / c': distill over its pure compute)")
    print(f"  online_over_cached_time  {r['online_over_cached_time']:.3f}   (epoch time of c / b)")
    print(f"  precompute_over_teacher  {r['precompute_over_teacher']:.3f}   (precompute / bare teacher, views/s)")
    if "rss_growth_8x" in r:
        print(f"  rss_growth_8x            {r['rss_growth_8x']:.3f}   (peak RSS 8x / 1x - 1)")
    if "data_path" in r:
        print_data_path(r["data_path"])
    print()


def print_data_path(measured: dict[str, dict[str, Any]]) -> None:
    """The data path table: ms per image per part, one thread, and images/s per core per reader."""
    first = measured["full"]
    print(f"data path alone, one core: ImageNet-sized JPEGs ({first['jpeg_size'][0]} x {first['jpeg_size'][1]}, "
          f"quality {first['jpeg_quality']}), views at {first['image_size']} px, {first['views']} views in precompute")
    print(f"  {'JPEGs':<16} {'read':>6} {'decode':>7} {'view':>6} {'collate':>8} {'distill/core':>13} "
          f"{'precompute/core':>16} {'main proc':>10}")
    for name, m in measured.items():
        ms = m["ms_per_image"]
        label = "full size" if name == "full" else f"max side {m['max_side']}"
        print(f"  {label:<16} {ms['read']:>6.2f} {ms['decode']:>7.2f} {ms['student_view']:>6.2f} "
              f"{ms['collate_student']:>8.3f} {m['distill_images_per_second_per_core']:>9.0f} i/s "
              f"{m['precompute_images_per_second_per_core']:>12.0f} i/s {ms['main_process']:>7.2f} ms")
    for name, m in measured.items():
        if "decode_speedup" in m:
            print(f"  decode_speedup_{name:<12} {m['decode_speedup']:.3f}   (full-size decode / pre-sized decode)")
