"""`python -m pipeline plan`: what a run of a params file will need, before it starts.

Every figure comes from the function the stages themselves use, applied to the run's counts:

- cache bytes (`pipeline.cache.stored_bytes_per_view` x views x images), full and top-k;
- peak disk of precompute (every shard's part, plus the part being written: a whole shard's
  views) and of the join (the parts plus the cache file's index: prompts, anchors, per-image rows;
  the views are not copied, `pipeline.cache.join_parts`);
- shared memory of each stage's DataLoader workers, per process and per machine (the
  `check_shared_memory` budgets of precompute, distill and probe);
- host and device memory of the probe (`pipeline.linear_probe.probe_memory`);
- FLOPs per image of the teacher forward and of the student's forward and training step
  (`torch.utils.flop_counter`, 2 per multiply-add; the models built with random weights);
- CPU cores per GPU the data path needs: distill's and precompute's images/s per core
  (`pipeline.datapath`, measured here in a few seconds or read from a bench JSON) against a GPU
  rate you give (`--gpu-images-per-second`; a GPU's distill rate from `bench` on it).

The counts (train and val images, classes) come from the shards' manifest when the shards exist,
else from the options (`--train-images 1281167 --val-images 50000 --classes 1000` for ImageNet).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import config as cfg
from pipeline.cache import stored_bytes_per_view
from pipeline.errors import PipelineError
from pipeline.features import centre_view_batch_bytes
from pipeline.linear_probe import probe_memory
from pipeline.prompts import read_templates
from pipeline.shards import MANIFEST_FILE, read_manifest
from pipeline.training import training_batch_bytes
from pipeline.views import PRECOMPUTE_PREFETCH, precompute_batch_bytes, precompute_images_per_batch

log = logging.getLogger(__name__)

GIB = 1024 ** 3
PROBE_PREFETCH = 2  # pipeline.features.PREFETCH
KEY_BYTES = 32  # stored_bytes_per_view's estimate of a key's string heap bytes


@dataclass(frozen=True)
class Counts:
    train_images: int
    val_images: int
    classes: int
    images_per_shard: int
    source: str  # where the counts come from


def counts_of(params: Path, train_images: int, val_images: int, classes: int) -> Counts:
    """The run's image and class counts: the options where given, else the shards' manifest."""
    shards = cfg.load_config("shards", params)
    manifest_path = Path(shards.out) / MANIFEST_FILE
    manifest = read_manifest(Path(shards.out)) if manifest_path.is_file() else None
    if manifest is not None:
        given = any((train_images, val_images, classes))
        splits = manifest["splits"]
        train_images = train_images or splits["train"]["samples"]
        val_images = val_images or splits["val"]["samples"]
        classes = classes or manifest["classes"]
        source = f"{manifest_path}" + (" and the options" if given else "")
    else:
        source = "the options"
    if not (train_images and val_images and classes):
        raise PipelineError(f"{manifest_path}: not found; give the run's counts with --train-images, --val-images "
                            f"and --classes (ImageNet-1K: 1281167, 50000, 1000)")
    return Counts(train_images, val_images, classes, shards.max_per_shard, source)


def anchor_count(params: Path, classes: int) -> int:
    """Anchors of the run's prompt set: one per class, or one per prompt (classes x templates, each
    class with one CPA context, as ImageNet's list has)."""
    prompts = cfg.load_config("precompute", params).prompts
    if prompts.anchors == "class":
        return classes
    if prompts.set == "cpa":
        return classes * len(read_templates(prompts.cpa_templates, ["name", "context"], "--prompts-cpa-templates"))
    return classes * len(read_templates(prompts.plain_templates, ["name"], "--prompts-plain-templates"))


def flops(fn, *args) -> float:
    """FLOPs of one call (2 per multiply-add), torch's counter."""
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel is invisible to the counter
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return float(counter.get_total_flops())


def teacher_costs(params: Path) -> dict[str, Any]:
    """The teacher's resolution, embedding width and forward FLOPs per image (random weights)."""
    from dataclasses import replace

    from pipeline.teacher import load_teacher

    teacher_config = cfg.load_config("precompute", params).teacher
    if teacher_config.checkpoint and not Path(teacher_config.checkpoint).is_file():
        teacher_config = replace(teacher_config, checkpoint="")  # the architecture is what counts here
    if teacher_config.model:
        teacher_config = replace(teacher_config, pretrained="", checkpoint="")  # no download for a FLOP count
    teacher = load_teacher(teacher_config, "cpu", precision="fp32", allow_random=True)
    size = teacher.image_size
    pixels = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    with torch.no_grad():
        count = flops(teacher.encode_image, pixels)
    return {"image_size": size, "embed_dim": teacher.embed_dim, "forward_flops": count}


def student_costs(params: Path) -> dict[str, Any]:
    from pipeline.student import Student

    train = cfg.load_config("distill", params).train
    model = Student(train.arch, 512, train.head, train.head_hidden)
    pixels = torch.zeros(2, 3, train.image_size, train.image_size, dtype=torch.uint8)
    with torch.no_grad():
        forward = flops(model.eval(), pixels[:1])

    def step() -> None:
        model.train()(pixels).pow(2).mean().backward()

    return {"image_size": train.image_size, "feature_dim": model.feature_dim, "forward_flops": forward,
            "step_flops": flops(step) / 2}


def shared_memory(params: Path, num_anchors: int, teacher: dict[str, Any], student: dict[str, Any],
                  processes: int) -> dict[str, dict[str, float]]:
    """Bytes the DataLoader workers of each stage hold in shared memory, per process (workers x
    prefetch x one batch, as each stage's own check computes them) and for `processes` per machine.
    The workers are the params' (a stage caps them at the cores of the machine it runs on)."""
    precompute = cfg.load_config("precompute", params)
    train = cfg.load_config("distill", params).train
    distill = cfg.load_config("distill", params)
    probe = cfg.load_config("probe", params)
    distill_batch = training_batch_bytes(train.batch_size, train.image_size, num_anchors, precompute.topk,
                                         teacher["embed_dim"], embeddings=distill.loss != "csm")
    budgets = {
        "precompute": (precompute.workers, PRECOMPUTE_PREFETCH,
                       precompute_batch_bytes(precompute_images_per_batch(precompute.batch_size, precompute.views),
                                              precompute.views, teacher["image_size"])),
        "distill": (train.workers, train.prefetch, distill_batch),
        "probe": (probe.workers, PROBE_PREFETCH,
                  centre_view_batch_bytes([teacher["image_size"], student["image_size"]], probe.batch_size)),
    }
    out = {}
    for stage, (workers, prefetch, batch) in budgets.items():
        one = workers * prefetch * batch
        out[stage] = {"workers": workers, "prefetch": prefetch, "batch_bytes": batch, "per_process_bytes": one,
                      "per_machine_bytes": one * (processes if stage != "probe" else 1)}
    return out


def make_plan(params: Path, train_images: int = 0, val_images: int = 0, classes: int = 0, topk: int = 0,
              processes: int = 1, gpu_images_per_second: float = 0.0, per_core: dict[str, float] | None = None,
              data_path_images: int = 32, teacher_views_per_second: float = 0.0) -> dict[str, Any]:
    """Every figure of the plan, as a dict (what `plan --json` writes)."""
    from pipeline import datapath

    counts = counts_of(params, train_images, val_images, classes)
    precompute = cfg.load_config("precompute", params)
    train = cfg.load_config("distill", params).train
    anchors = anchor_count(params, counts.classes)
    log.info("plan: building the teacher and the student with random weights to count their FLOPs")
    teacher = teacher_costs(params)
    student = student_costs(params)
    views = precompute.views
    k = topk or precompute.topk or 64
    per_view = {"full": stored_bytes_per_view(anchors, views, 0, teacher["embed_dim"], precompute.store_embeddings,
                                              KEY_BYTES)}
    if k < anchors:  # top-k stores less than all anchors only below their count
        per_view[f"top-{k}"] = stored_bytes_per_view(anchors, views, k, teacher["embed_dim"],
                                                     precompute.store_embeddings, KEY_BYTES)
    cache = {name: value * views * counts.train_images for name, value in per_view.items()}
    stored = "full" if not precompute.topk else f"top-{precompute.topk}"
    run_cache = stored_bytes_per_view(anchors, views, precompute.topk, teacher["embed_dim"],
                                      precompute.store_embeddings, KEY_BYTES) * views * counts.train_images
    one_part = run_cache / counts.train_images * min(counts.images_per_shard, counts.train_images)
    index = (anchors * teacher["embed_dim"] * 4 * 2  # prompt and anchor embeddings (float32; prompts >= anchors)
             + counts.train_images * (KEY_BYTES + 12) + counts.train_images * views * 4)
    dims = {"teacher": teacher["embed_dim"], "student": student["feature_dim"], "random_init": student["feature_dim"],
            "supervised": student["feature_dim"], "student_embedding": teacher["embed_dim"]}
    probe_train = min(counts.train_images, cfg.load_config("probe", params).max_train_images or counts.train_images)
    memory = {device: probe_memory(probe_train, counts.val_images, dims, counts.classes, device=device)
              for device in ("cuda", "cpu")}
    if per_core is None:
        log.info("plan: timing the data path on %d ImageNet-sized JPEGs (one core)", data_path_images)
        measured = datapath.measure(data_path_images, train.image_size, teacher["image_size"], views,
                                    train.batch_size, repeats=2)
        per_core = {"distill": measured["distill_images_per_second_per_core"],
                    "precompute": measured["precompute_images_per_second_per_core"], "source": "measured now"}
    plan = {
        "params": str(params),
        "counts": {"train_images": counts.train_images, "val_images": counts.val_images, "classes": counts.classes,
                   "anchors": anchors, "views": views, "source": counts.source},
        "cache_bytes": cache, "cache_bytes_per_view": per_view, "cache_stored": stored,
        "disk": {"precompute_peak_bytes": run_cache + one_part, "join_peak_bytes": run_cache + index},
        "shared_memory": shared_memory(params, anchors, teacher, student, processes),
        "processes_per_machine": processes,
        "probe": {device: {"host_bytes": m.host_bytes, "device_bytes": m.device_bytes, "described": m.describe()}
                  for device, m in memory.items()},
        "teacher": teacher, "student": student,
        "data_path_images_per_second_per_core": per_core,
    }
    if gpu_images_per_second:  # distill: images/s of the student's training step on one GPU
        plan["cores_per_gpu_distill"] = {
            "gpu_images_per_second": gpu_images_per_second,
            "cores": datapath.cores_per_gpu(gpu_images_per_second, per_core["distill"])}
    if teacher_views_per_second:  # precompute: the teacher's views/s on one GPU, `views` per image
        plan["cores_per_gpu_precompute"] = {
            "gpu_views_per_second": teacher_views_per_second,
            "cores": datapath.cores_per_gpu(teacher_views_per_second / views, per_core["precompute"])}
    return plan


def per_core_from_bench(path: Path) -> dict[str, float]:
    """The full-size JPEG per-core rates of a bench JSON (`bench --json`) with its data path."""
    try:
        measured = json.loads(path.read_text())["data_path"]["full"]
        return {"distill": measured["distill_images_per_second_per_core"],
                "precompute": measured["precompute_images_per_second_per_core"], "source": str(path)}
    except (OSError, ValueError, KeyError) as err:
        raise PipelineError(f"{path}: not a bench JSON with its data path ({err}); run `python -m pipeline bench "
                            f"--json FILE` with --data-path-images above 0") from None


def describe(plan: dict[str, Any]) -> list[str]:
    """The plan as lines of text."""
    def gib(value: float) -> str:
        return f"{value / GIB:,.2f} GiB" if value >= GIB / 100 else f"{value / 1024 ** 2:,.1f} MiB"

    c = plan["counts"]
    lines = [f"plan for {plan['params']}: {c['train_images']:,} train / {c['val_images']:,} val images, "
             f"{c['classes']} classes, {c['anchors']} anchors, {c['views']} views per image (counts: {c['source']})"]
    lines.append("cache:")
    for name, value in plan["cache_bytes"].items():
        lines.append(f"  {name:<28} {gib(value):>12}   ({plan['cache_bytes_per_view'][name]:.1f} B per view)")
    lines.append(f"  peak disk, precompute        {gib(plan['disk']['precompute_peak_bytes']):>12}   "
                 f"(the parts of the {plan['cache_stored']} cache + the part being written)")
    lines.append(f"  peak disk, join              {gib(plan['disk']['join_peak_bytes']):>12}   "
                 "(the parts + the cache file's index; views are not copied)")
    lines.append(f"shared memory (/dev/shm) of the DataLoader workers, {plan['processes_per_machine']} process(es) "
                 "per machine:")
    for stage, m in plan["shared_memory"].items():
        lines.append(f"  {stage:<10} {m['workers']} workers x {m['prefetch']} x {gib(m['batch_bytes'])} = "
                     f"{gib(m['per_process_bytes'])} per process, {gib(m['per_machine_bytes'])} per machine")
    lines.append(f"{plan['probe']['cuda']['described']} (on a GPU machine)")
    lines.append(f"{plan['probe']['cpu']['described']} (on a CPU-only machine)")
    t, s = plan["teacher"], plan["student"]
    lines.append(f"teacher forward: {t['forward_flops'] / 1e9:.2f} GFLOPs per view at {t['image_size']} px "
                 f"(embedding {t['embed_dim']})")
    lines.append(f"student: forward {s['forward_flops'] / 1e9:.2f} GFLOPs, training step {s['step_flops'] / 1e9:.2f} "
                 f"GFLOPs per image at {s['image_size']} px")
    rate = plan["data_path_images_per_second_per_core"]
    lines.append(f"data path per core on ImageNet-sized JPEGs ({rate['source']}): distill {rate['distill']:.0f} "
                 f"images/s, precompute {rate['precompute']:.0f} images/s (read, decode, views, collate; one thread)")
    if "cores_per_gpu_distill" in plan:
        g = plan["cores_per_gpu_distill"]
        lines.append(f"distill: {g['cores']:.1f} CPU cores per GPU to feed {g['gpu_images_per_second']:,.0f} images/s "
                     "(JPEG decoding and the view on the CPU)")
    if "cores_per_gpu_precompute" in plan:
        g = plan["cores_per_gpu_precompute"]
        lines.append(f"precompute: {g['cores']:.1f} CPU cores per GPU to feed the teacher "
                     f"{g['gpu_views_per_second']:,.0f} views/s ({plan['counts']['views']} views per decoded image)")
    return lines
