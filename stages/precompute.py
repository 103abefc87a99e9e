"""`python -m pipeline precompute`: stage one, the teacher once over augmented views.

For every training image, V views are sampled (a function of the seed, the shard and the
image's position in it), rendered with `apply_view` at the teacher's resolution and
encoded; their cosine similarities to the anchors are stored with the view parameters.
Each completed shard is saved as a part file, so a killed run continues after its last
completed shard; the cache file, written under a temporary name and renamed, indexes the
parts (`pipeline.cache`: they stay as the storage of the views). The parts are written on a
background thread (`PartWriter`) while the teacher encodes the next shard.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import cache, decoding, distributed, faults, precision, preemption
from pipeline.atomic import OutputLock, write_json
from pipeline.config import PrecomputeConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.prompts import anchor_embeddings, build_prompt_set, encode_prompts, prompt_set_digest, prompt_store
from pipeline.shards import (
    Sample,
    ShardBatches,
    check_shared_memory,
    iterate_batches,
    list_shards,
    loader_workers,
    read_classes,
    sample_count,
    shard_list_digest,
)
from pipeline.teacher import identity_difference, load_teacher, resolve_device
from pipeline.views import (
    PRECOMPUTE_PREFETCH,
    apply_view,
    precompute_batch_bytes,
    precompute_images_per_batch,
    sample_view_params,
    view_rng,
)

log = logging.getLogger(__name__)

#: Batches each DataLoader worker keeps ready in shared memory (`iterate_batches`' default).
PREFETCH = PRECOMPUTE_PREFETCH

#: Finished parts queued for the writer thread or being written. Two let the teacher go on
#: through one slow write; more would only hold more shards' outputs in memory.
PARTS_PENDING = 2


class ViewRenderer:
    """Per sample (in a DataLoader worker): V view parameters and the views at the teacher's size."""

    def __init__(self, config: PrecomputeConfig, size: int) -> None:
        self.config, self.size = config, size

    def __call__(self, sample: Sample, _: Any) -> dict[str, torch.Tensor]:
        c = self.config
        if sample.image is None:  # `--decode device`: the size from the JPEG's header, the views on the device
            width, height = encoded_size(sample.jpeg)
        else:
            _, height, width = sample.image.shape
        params = sample_view_params(view_rng(c.seed, sample.shard, sample.position), c.views,
                                    width, height, c.crop_scale, c.crop_ratio, c.flip)
        if sample.image is None:
            return {"params": torch.from_numpy(params), decoding.BYTES: decoding.encoded(sample.jpeg)}
        views = torch.stack([apply_view(sample.image, p, self.size) for p in params])
        return {"params": torch.from_numpy(params), "views": views}


def encoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image from its header (no decode); (1, 1) when unreadable (the
    device's decode then finds the sample corrupt and drops it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable header: left to the decoder to report
        return 1, 1


def check_options(config: PrecomputeConfig) -> None:
    low, high = config.crop_scale
    if not 0 < low <= high <= 1:
        raise PipelineError("option --crop-scale: expected 0 < min <= max <= 1")
    if not 0 < config.crop_ratio[0] <= config.crop_ratio[1]:
        raise PipelineError("option --crop-ratio: expected 0 < min <= max")
    if config.views < 1:
        raise PipelineError("option --views must be at least 1")
    if config.topk < 0:
        raise PipelineError("option --topk must be 0 (all anchors) or positive")
    if config.batch_size < config.views:
        raise PipelineError(f"option --batch-size must be at least --views ({config.views})")


def run(config: PrecomputeConfig, allow_random_teacher: bool = False) -> dict[str, Any]:
    """Stage one. `allow_random_teacher` is for `bench` only (speed of a teacher without weights).

    Under torchrun, rank r encodes the shards r, r + N, r + 2N, ... (those without a part
    yet); after a barrier, rank 0 writes the cache file. The result does not depend on N.
    Returns the metrics (on rank 0; an empty dict on the other ranks).
    """
    check_options(config)
    faults.planned()  # a wrong CSM_DISTILL_FAULT is refused before any work
    requested = resolve_device(config.device)
    # gloo whatever the device: the ranks meet only at the start and the end (a barrier, a sum of
    # counters), hours apart (BARRIER_TIMEOUT). Given the device, `start` makes this rank's GPU
    # the current one, so that no thread of it (pin memory) opens a context on GPU 0.
    process = distributed.start(requested, timeout=distributed.BARRIER_TIMEOUT, backend="gloo")
    try:
        with OutputLock(config.out) if process.main else contextlib.nullcontext():
            return run_process(config, process, distributed.local_device(requested, process),
                               allow_random_teacher)
    finally:
        distributed.stop()


def device_name(device: torch.device) -> str:
    """The device's model as the cache records it: e.g. 'NVIDIA H100 80GB HBM3', or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_process(config: PrecomputeConfig, process: distributed.Process, device: torch.device,
                allow_random_teacher: bool) -> dict[str, Any]:
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shards = list_shards(config.shards, "train")
    classes = read_classes(config.shards)
    # TF32 on or off explicitly: PyTorch's default leaves cuDNN convolutions on TF32, even for fp32
    precision.configure(precision.for_device(config.precision, device))
    teacher = load_teacher(config.teacher, str(device), allow_random=allow_random_teacher,
                           precision=config.precision)
    prompt_set = build_prompt_set(classes, config.prompts)
    header = cache.CacheHeader(
        teacher_identity=teacher.identity,
        embed_dim=teacher.embed_dim,
        teacher_image_size=teacher.image_size,
        teacher_mean=teacher.mean,
        teacher_std=teacher.std,
        views_per_image=config.views,
        crop_scale=config.crop_scale,
        crop_ratio=config.crop_ratio,
        flip=config.flip,
        view_seed=config.seed,
        prompt_digest=prompt_set_digest(prompt_set),
        prompt_set=config.prompts.set,
        anchor_mode=prompt_set.anchors,
        num_classes=prompt_set.num_classes,
        num_anchors=prompt_set.num_anchors,
        shard_digest=shard_list_digest(shards),
        topk=min(config.topk, prompt_set.num_anchors),
        store_embeddings=config.store_embeddings,
        teacher_device=device_name(device),
    )
    if process.main:
        resume_or_start(out, header, [s.name for s in shards])
        # rank 0 encodes the prompts into the store; after the barrier the other ranks read them there
        prompt_embeddings = encode_prompts(teacher, prompt_set.prompts, prompt_store(out))
        # read before the barrier: after it, the other ranks' new parts would count as done before this run
        done = cache.completed_parts(out, header.shard_digest)
    distributed.barrier()
    if not process.main:
        prompt_embeddings = encode_prompts(teacher, prompt_set.prompts, prompt_store(out))
        done = cache.completed_parts(out, header.shard_digest)  # only this rank's shards matter to it
    todo = [s for s in range(process.rank, len(shards), process.world) if s not in done]
    if done and process.main:
        log.info("resuming: %d of %d shards already done", len(done), len(shards))
    check_loader_memory(config, teacher.image_size, len(todo), process.local_world)

    prompt_classes = torch.tensor(prompt_set.prompt_classes)
    anchors = anchor_embeddings(prompt_embeddings.cpu(), prompt_classes, prompt_set.num_classes,
                                prompt_set.anchors)
    started = time.perf_counter()
    images_done = encode_shards(config, teacher, anchors, shards, todo, out, header)
    images_done = int(distributed.sum_across([images_done])[0])  # waits for every rank's parts
    if not process.main:
        return {}
    corrupt = cache.join_parts(
        out, header, [s.name for s in shards], prompt_set.prompts, prompt_classes.numpy(),
        prompt_embeddings.cpu().numpy(), anchors.numpy(), prompt_set.anchor_classes().numpy(),
    )
    seconds = time.perf_counter() - started

    reader = cache.TeacherCache(out)
    views = reader.num_images * config.views
    stored = reader.stored_bytes()
    metrics = {
        "images": reader.num_images,
        "views": views,
        "skipped": len(corrupt),
        "skipped_keys": corrupt,
        "seconds": round(seconds, 2),
        "images_this_run": images_done,
        "images_per_second": round(images_done / seconds, 1) if seconds > 0 else 0.0,
        "views_per_second": round(images_done * config.views / seconds, 1) if seconds > 0 else 0.0,
        "bytes_per_view": round(stored / max(1, views), 1),
        "file_bytes": stored,
        "topk": header.topk,
        "device": str(teacher.device),
    }
    write_json(config.metrics, metrics)
    write_resolved(config, out.with_name(out.name + ".config.json"))
    log.info("wrote %s: %d images x %d views, %.1f images/s, %.0f bytes/view, %d skipped", out,
             metrics["images"], config.views, metrics["images_per_second"],
             metrics["bytes_per_view"], len(corrupt))
    return metrics


def run_differences(previous: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """What differs between a partial run's state and this run's: the header's settings, the
    teacher by content (its names may differ: a renamed weights file is the same teacher), the
    shard names. Empty when the parts can be kept."""
    before, now = previous["header"], state["header"]
    unchecked = {"teacher_identity", *cache.CacheHeader.INFORMATIONAL}  # the device: `warn_other_device`
    changed = sorted(k for k in before.keys() | now.keys() if k not in unchecked and before.get(k) != now.get(k))
    teacher = identity_difference(before.get("teacher_identity", ""), now["teacher_identity"],
                                  sides=("partial run", "this run"))
    changed += [f"teacher: {teacher}"] if teacher else []
    changed += ["shard names"] if previous["shards"] != state["shards"] else []
    return changed


def resume_or_start(out: Path, header: cache.CacheHeader, shard_names: list[str]) -> None:
    """Keep the parts of an interrupted run with the same settings; refuse a changed one."""
    state = {"header": header.to_attrs(), "shards": shard_names}
    previous = cache.read_state(out)
    changed = run_differences(previous, state) if previous is not None else []
    if changed:
        directory = cache.parts_dir(out)
        if out.is_file():
            raise PipelineError(
                f"{out}: a cache made with other settings is there (its views in {directory}); delete "
                f"both, or give another --out, to make a new one"
            )
        if previous["header"]["shard_digest"] != header.shard_digest:
            raise PipelineError(
                f"{directory}: a partial run over a different shard list; the shards changed "
                f"since. Delete {directory} to start over"
            )
        raise PipelineError(
            f"{directory}: a partial run with other settings ({', '.join(changed)}); "
            f"delete {directory} to start over, or run with the same settings"
        )
    if previous is not None:
        warn_other_device(out, previous["header"].get("teacher_device", ""), header.teacher_device)
    cache.write_state(out, state)


def warn_other_device(out: Path, before: str, now: str) -> None:
    """A partial run continued on another device model: its parts are kept (same settings, same
    precision), with a warning, as the two devices' outputs can differ in rounding."""
    if before and before != now:
        log.warning("%s: the partial run ran on %s, this run on %s; its parts are kept (same settings "
                    "and precision: the outputs differ in rounding at most)", cache.parts_dir(out), before, now)


def images_per_batch(config: PrecomputeConfig) -> int:
    """Images per teacher forward: --batch-size counts views, --views per image."""
    return precompute_images_per_batch(config.batch_size, config.views)


def check_loader_memory(config: PrecomputeConfig, image_size: int, shards: int, local_processes: int) -> None:
    """Refuse, before the loader starts, prefetched views that /dev/shm cannot hold (with 8
    ranks x 16 workers, the workers would die by SIGBUS mid-run); `shards`: this rank's to encode."""
    workers = loader_workers(config.workers, shards)
    check_shared_memory("precompute", f"--workers {config.workers} --batch-size {config.batch_size}", workers,
                        PREFETCH, precompute_batch_bytes(images_per_batch(config), config.views, image_size),
                        local_processes)


class PartWriter:
    """Writes finished shards' part files on one background thread while the teacher encodes.

    A part (an HDF5 image built in memory, its checksums, write, fsync, rename) takes seconds on
    a large shard, which the GPU would otherwise spend idle. At most PARTS_PENDING parts wait:
    `submit` waits for the oldest when the writer is behind, so memory stays bounded. A failure
    (a full disk) is raised in the main thread by the next `submit` or by `finish`, the same
    one-line error. One thread writes the parts in order, so the test hook kill-after-shard:N
    fires right after the Nth part is on disk and before the next begins (under torchrun its
    barrier runs on this thread: the main thread meets the other ranks only after `finish`).
    Leaving the `with` block, even by an error, waits for the parts submitted: finished shards
    are kept for a resume. The thread starts at the first part, after the DataLoader has forked
    its workers (no fork while it may hold a lock).
    """

    def __init__(self, out: Path, header: cache.CacheHeader) -> None:
        self.out, self.header = out, header
        self.pending: collections.deque[Future] = collections.deque()
        self.written = 0  # counted on the writer thread
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompute-parts")

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.executor.shutdown(wait=True)

    def submit(self, shard: int, buffer: dict[str, list]) -> None:
        """Queue a shard's part; raises the failure of an earlier one."""
        while self.pending and (self.pending[0].done() or len(self.pending) >= PARTS_PENDING):
            self.pending.popleft().result()
        self.pending.append(self.executor.submit(self.write, shard, buffer))

    def finish(self) -> None:
        """Return when every submitted part is on disk; raises the first failure."""
        while self.pending:
            self.pending.popleft().result()

    def write(self, shard: int, buffer: dict[str, list]) -> None:
        write_shard_part(self.out, shard, buffer, self.header)
        self.written += 1
        faults.kill_after("shard", self.written)  # test hook, see pipeline.faults


def encode_shards(
    config: PrecomputeConfig,
    teacher,
    anchors: torch.Tensor,
    shards: list[Path],
    todo: list[int],
    out: Path,
    header: cache.CacheHeader,
) -> int:
    """Run the teacher over the views of the shards in `todo`, a part per shard (`PartWriter`).

    Returns the images encoded, once every part is on disk. A stop signal (`pipeline.preemption`)
    ends the loop after the batch in progress: the parts of finished shards are written, the
    shard in progress is dropped (a part holds a whole shard, never part of one), and `Stopped`
    is raised for the CLI's exit code; the same command encodes the rest.
    """
    if not todo:
        return 0
    dataset = ShardBatches(shards, images_per_batch(config), ViewRenderer(config, teacher.image_size),
                           shard_indices=todo, decode=config.decode == "cpu")
    anchors_t = anchors.to(teacher.device).T
    buffers: dict[int, dict[str, list]] = {}
    progress = Progress(sample_count([shards[s] for s in todo]), "precompute", "img")
    images, finished = 0, 0
    with preemption.StopSignals() as signals, PartWriter(out, header) as writer:
        batches = iterate_batches(dataset, config.workers, pin_memory=teacher.device.type == "cuda",
                                  prefetch=PREFETCH)
        for number, batch in enumerate(batches, 1):
            faults.signal_at("batch", number)  # test hook: a signal while this batch is encoded
            buffer = buffers.setdefault(batch["shard"], {k: [] for k in
                                                         ("keys", "positions", "labels", "params",
                                                          "similarities", "embeddings", "corrupt")})
            n = encode_batch(config, teacher, anchors_t, batch, buffer, shards[batch["shard"]])
            images += n
            progress.update(n)
            if batch["last"]:
                writer.submit(batch["shard"], buffers.pop(batch["shard"]))
                finished += 1
            if signals.received:
                batches.close()  # stops the DataLoader workers
                break
        writer.finish()  # before the ranks meet and the join reads the parts
        progress.close()
        if signals.received:  # raised inside the block: the process ignores the signals until it exits
            process = distributed.this_process()
            rank = f"rank {process.rank}: " if process.distributed else ""
            dropped = f", the shard in progress dropped ({sum(len(b['keys']) for b in buffers.values())} images)" \
                if buffers else ""
            log.warning("%sstopped by %s after %d of %d shards of this run%s; run the same command to resume",
                        rank, preemption.name(signals.received), finished, len(todo), dropped)
            raise preemption.Stopped(signals.received)
    return images


def encode_batch(config: PrecomputeConfig, teacher, anchors_t: torch.Tensor, batch: dict[str, Any],
                 buffer: dict[str, list], shard: Path) -> int:
    """Encode a batch's views and add them to its shard's `buffer`; returns its image count."""
    if config.decode == "device":  # decoded and cut on the teacher's device (pipeline.decoding)
        batch = decoding.device_views(batch, teacher.device, teacher.image_size, views_from="params")
    buffer["corrupt"].extend(batch["corrupt"])
    if not batch["keys"]:
        return 0
    embeddings = teacher.encode_image(batch["views"].flatten(0, 1))
    similarities = (embeddings @ anchors_t).cpu()
    if not torch.isfinite(similarities).all():  # refused before anything of the shard is written
        bad = sorted({batch["keys"][i // config.views] for i in
                      torch.nonzero(~torch.isfinite(similarities).all(-1)).flatten().tolist()})
        raise PipelineError(
            f"{shard}: the teacher gave non-finite similarities for {len(bad)} image(s) "
            f"({', '.join(bad[:3])}); check the teacher weights (--teacher-checkpoint) and --precision"
        )
    buffer["keys"].extend(batch["keys"])
    buffer["positions"].append(batch["positions"].numpy())
    buffer["labels"].append(batch["labels"].numpy())
    buffer["params"].append(batch["params"].flatten(0, 1).numpy())
    buffer["similarities"].append(similarities.to(torch.float16).numpy())
    if config.store_embeddings:
        buffer["embeddings"].append(embeddings.cpu().to(torch.float16).numpy())
    return len(batch["keys"])


def write_shard_part(out: Path, shard: int, buffer: dict[str, list], header: cache.CacheHeader) -> None:
    K, D = header.num_anchors, header.embed_dim

    def stacked(name: str, empty_shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.concatenate(buffer[name]) if buffer[name] else np.empty(empty_shape, dtype)

    part = cache.ShardPart(
        shard=shard,
        keys=buffer["keys"],
        positions=stacked("positions", (0,), np.int64),
        labels=stacked("labels", (0,), np.int64),
        params=stacked("params", (0, 5), np.float32),
        similarities=stacked("similarities", (0, K), np.float16),
        embeddings=stacked("embeddings", (0, D), np.float16) if header.store_embeddings else None,
        corrupt=buffer["corrupt"],
    )
    if buffer["corrupt"]:
        log.warning("shard %d: skipped %d corrupt sample(s): %s", shard, len(buffer["corrupt"]),
                    ", ".join(buffer["corrupt"][:5]))
    cache.write_part(out, part, header)


