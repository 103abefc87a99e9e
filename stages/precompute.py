"""`python -m pipeline precompute`: stage one, the teacher once over augmented views.

For every training image, V views are sampled (a function of the seed, the shard and the
image's position in it), rendered with `apply_view` at the teacher's resolution and
encoded; their cosine similarities to the anchors are stored with the view parameters.
Each completed shard is saved as a part file, so a killed run continues after its last
completed shard; the cache file, written under a temporary name and renamed, indexes the
parts (`pipeline.cache`: they stay as the storage of the views).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import cache, distributed, faults
from pipeline.atomic import OutputLock, write_json
from pipeline.config import PrecomputeConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.prompts import anchor_embeddings, build_prompt_set, encode_prompts, prompt_set_digest, prompt_store
from pipeline.shards import (
    Sample,
    ShardBatches,
    iterate_batches,
    list_shards,
    read_classes,
    sample_count,
    shard_list_digest,
)
from pipeline.teacher import identity_difference, load_teacher, resolve_device
from pipeline.views import apply_view, sample_view_params, view_rng

log = logging.getLogger(__name__)


class ViewRenderer:
    """Per sample (in a DataLoader worker): V view parameters and the views at the teacher's size."""

    def __init__(self, config: PrecomputeConfig, size: int) -> None:
        self.config, self.size = config, size

    def __call__(self, sample: Sample, _: Any) -> dict[str, torch.Tensor]:
        c = self.config
        _, height, width = sample.image.shape
        params = sample_view_params(view_rng(c.seed, sample.shard, sample.position), c.views,
                                    width, height, c.crop_scale, c.crop_ratio, c.flip)
        views = torch.stack([apply_view(sample.image, p, self.size) for p in params])
        return {"params": torch.from_numpy(params), "views": views}


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
    process = distributed.start()
    try:
        with OutputLock(config.out) if process.main else contextlib.nullcontext():
            return run_process(config, process, allow_random_teacher)
    finally:
        distributed.stop()


def run_process(config: PrecomputeConfig, process: distributed.Process,
                allow_random_teacher: bool) -> dict[str, Any]:
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shards = list_shards(config.shards, "train")
    classes = read_classes(config.shards)
    device = distributed.local_device(resolve_device(config.device), process)
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
    changed = sorted(k for k in before.keys() | now.keys() if k != "teacher_identity" and before.get(k) != now.get(k))
    teacher = identity_difference(before.get("teacher_identity", ""), now["teacher_identity"])
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
    cache.write_state(out, state)


def encode_shards(
    config: PrecomputeConfig,
    teacher,
    anchors: torch.Tensor,
    shards: list[Path],
    todo: list[int],
    out: Path,
    header: cache.CacheHeader,
) -> int:
    """Run the teacher over the views of the shards in `todo`, writing a part per shard."""
    if not todo:
        return 0
    images_per_batch = max(1, config.batch_size // config.views)
    dataset = ShardBatches(shards, images_per_batch, ViewRenderer(config, teacher.image_size),
                           shard_indices=todo)
    anchors_t = anchors.to(teacher.device).T
    pending: dict[int, dict[str, list]] = {}
    progress = Progress(sample_count([shards[s] for s in todo]), "precompute", "img")
    images, parts = 0, 0
    for batch in iterate_batches(dataset, config.workers, pin_memory=teacher.device.type == "cuda"):
        buffer = pending.setdefault(batch["shard"], {k: [] for k in
                                                     ("keys", "positions", "labels", "params",
                                                      "similarities", "embeddings", "corrupt")})
        buffer["corrupt"].extend(batch["corrupt"])
        if batch["keys"]:
            n = len(batch["keys"])
            views = batch["views"].flatten(0, 1)
            embeddings = teacher.encode_image(views)
            similarities = (embeddings @ anchors_t).cpu()
            if not torch.isfinite(similarities).all():  # refused before anything is written
                bad = sorted({batch["keys"][i // config.views] for i in
                              torch.nonzero(~torch.isfinite(similarities).all(-1)).flatten().tolist()})
                raise PipelineError(
                    f"{shards[batch['shard']]}: the teacher gave non-finite similarities for "
                    f"{len(bad)} image(s) ({', '.join(bad[:3])}); check the teacher weights "
                    f"(--teacher-checkpoint) and --precision"
                )
            buffer["keys"].extend(batch["keys"])
            buffer["positions"].append(batch["positions"].numpy())
            buffer["labels"].append(batch["labels"].numpy())
            buffer["params"].append(batch["params"].flatten(0, 1).numpy())
            buffer["similarities"].append(similarities.to(torch.float16).numpy())
            if config.store_embeddings:
                buffer["embeddings"].append(embeddings.cpu().to(torch.float16).numpy())
            images += n
            progress.update(n)
        if batch["last"]:
            write_shard_part(out, batch["shard"], pending.pop(batch["shard"]), header)
            parts += 1
            faults.kill_after("shard", parts)  # test hook, see pipeline.faults
    progress.close()
    return images


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


