"""Training against the cache: view replay, the epoch loop, schedules, checkpoints and resume.

Distillation and the supervised reference share all of it; they differ only in the head
and the loss (an `Objective`). Every epoch, each image uses one of its V stored views, a
deterministic function of (seed, epoch, image), replayed with the same `apply_view` as
stage one at the student's resolution. Each worker opens the HDF5 file itself and reads a
shard's targets in one slice. Checkpoints are written atomically every epoch (and every N
steps); rerunning the same command resumes and, on CPU, ends with the same weights.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import ShardTargets, TeacherCache
from pipeline.config import TrainConfig, to_dict, write_resolved
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.shards import Sample, ShardBatches, iterate_batches
from pipeline.student import Student, build_student, save_checkpoint
from pipeline.teacher import autocast, resolve_device
from pipeline.views import apply_view

log = logging.getLogger(__name__)

MIN_BATCH = 2  # BatchNorm needs two samples; a one-image shard tail is skipped


def chosen_views(seed: int, epoch: int, shard: int, count: int, views_per_image: int) -> np.ndarray:
    """Which stored view each image of a shard uses in an epoch (a function of seed, epoch, image)."""
    return np.random.default_rng([seed, epoch, shard]).integers(0, views_per_image, size=count)


@dataclass
class ShardReplay:
    targets: ShardTargets  # the chosen view of every image of the shard
    row_of_position: dict[int, int]


class ReplayViews:
    """prepare/shard_context for ShardBatches: replays one stored view per image per epoch."""

    def __init__(self, cache: TeacherCache, seed: int, epoch: int, image_size: int,
                 with_targets: bool, with_embeddings: bool = False) -> None:
        self.cache, self.seed, self.epoch = cache, seed, epoch
        self.image_size, self.with_targets = image_size, with_targets
        self.with_embeddings = with_embeddings

    def context(self, shard: int) -> ShardReplay:
        count = int(self.cache.image_count[shard])
        views = chosen_views(self.seed, self.epoch, shard, count, self.cache.header.views_per_image)
        targets = self.cache.shard_targets(shard, views, self.with_embeddings)
        return ShardReplay(targets, targets.row_of_position())

    def __call__(self, sample: Sample, replay: ShardReplay) -> dict[str, torch.Tensor]:
        row = replay.row_of_position.get(sample.position)
        if row is None:
            raise PipelineError(
                f"{self.cache.path}: has no rows for sample {sample.key}; the cache was made from "
                f"other shards, re-run precompute"
            )
        prepared = {"pixels": apply_view(sample.image, replay.targets.params[row], self.image_size)}
        if self.with_targets:
            prepared["targets"] = torch.from_numpy(replay.targets.similarities[row])
        if self.with_embeddings:
            prepared["teacher_embeddings"] = torch.from_numpy(replay.targets.embeddings[row])
        return prepared


@dataclass
class Objective:
    """What a training run optimises: the model's head and the loss on a batch."""

    name: str
    model_spec: dict[str, Any]
    loss: Callable[[torch.Tensor, dict[str, Any]], dict[str, torch.Tensor]]
    needs_targets: bool
    score_name: str  # the per-batch quality term reported beside the loss
    needs_embeddings: bool = False  # the cached teacher image embeddings of the views


def batches_per_epoch(image_counts: np.ndarray, batch_size: int) -> int:
    return int(sum(math.ceil(int(c) / batch_size) for c in image_counts))


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to base_lr, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and convolutions only, not on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


class RunState:
    """Everything needed to continue a run: weights, optimiser, position, per-epoch history."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.epoch_sums: dict[str, float] = {}

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            log.warning("%s: written with other settings; starting over", self.path)
            return False
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.history = json.loads(state["history"])
        self.epoch_sums = json.loads(state["epoch_sums"])
        return True

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        save_checkpoint(self.path, {
            "fingerprint": self.fingerprint,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": json.dumps(self.history),
            "epoch_sums": json.dumps(self.epoch_sums),
        })


def train(
    config: TrainConfig,
    objective: Objective,
    cache: TeacherCache,
    shards: list[Path],
    run_dir: Path,
    extra_fingerprint: dict[str, Any],
) -> tuple[Student, list[dict[str, float]]]:
    """Train `objective` for config.epochs; resumable from run_dir/last.pt. Returns model, history."""
    if config.epochs < 1 or config.batch_size < MIN_BATCH:
        raise PipelineError("options --epochs must be >= 1 and --batch-size >= 2")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    # channels_last is faster for convolutions on GPU and, measured here, on CPU too (+20%).
    model = build_student(objective.model_spec).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = batches_per_epoch(cache.image_count, config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    fingerprint = json.dumps({"train": to_dict(config), "objective": objective.name,
                              "model": objective.model_spec, "cache": cache.header.to_attrs(),
                              **extra_fingerprint}, sort_keys=True)
    state = RunState(run_dir / "last.pt", fingerprint)
    if state.load(model, optimizer):
        log.info("resuming %s at epoch %d, step %d", objective.name, state.epoch + 1,
                 state.step_in_epoch)
    anchors = cache.anchors().to(device)

    while state.epoch < config.epochs:
        train_one_epoch(model, objective, optimizer, cache, shards, anchors, config, state,
                        steps_per_epoch, total_steps, warmup_steps, device)
        state.epoch += 1
        state.step_in_epoch, state.epoch_sums = 0, {}
        state.save(model, optimizer)
    return model.eval(), state.history


def train_one_epoch(
    model: Student,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    cache: TeacherCache,
    shards: list[Path],
    anchors: torch.Tensor,
    config: TrainConfig,
    state: RunState,
    steps_per_epoch: int,
    total_steps: int,
    warmup_steps: int,
    device: torch.device,
) -> None:
    model.train()
    replay = ReplayViews(cache, config.seed, state.epoch, config.image_size, objective.needs_targets,
                         objective.needs_embeddings)
    dataset = ShardBatches(shards, config.batch_size, replay, replay.context,
                           order_seed=config.seed, epoch=state.epoch)
    sums = state.epoch_sums or {"loss": 0.0, "score": 0.0, "images": 0, "seconds": 0.0}
    progress = Progress(steps_per_epoch, f"{objective.name} {state.epoch + 1}/{config.epochs}", "step",
                        initial=state.step_in_epoch)
    started = time.perf_counter()
    for index, batch in enumerate(iterate_batches(dataset, config.workers,
                                                  pin_memory=device.type == "cuda")):
        if index < state.step_in_epoch:
            continue  # replaying the order of an interrupted epoch up to where it stopped
        lr = learning_rate(state.global_step, total_steps, warmup_steps, config.lr)
        if len(batch["keys"]) >= MIN_BATCH:
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = train_step(model, optimizer, objective, batch, anchors, device, config.precision)
            if not torch.isfinite(terms["loss"]):
                # Stop before anything is saved: last.pt still holds the last good state.
                raise PipelineError(
                    f"{objective.name}: the loss is {terms['loss'].item()} at epoch {state.epoch + 1}, step "
                    f"{state.step_in_epoch + 1} (lr {lr:.2g}); {state.path} keeps the last good checkpoint; "
                    f"lower --lr, or check the cache with `python -m pipeline inspect`"
                )
            n = len(batch["keys"])
            sums["loss"] += terms["loss"].item() * n
            sums["score"] += terms[objective.score_name].item() * n
            sums["images"] += n
        state.step_in_epoch += 1
        state.global_step += 1
        elapsed = sums["seconds"] + time.perf_counter() - started
        progress.update()
        if sums["images"]:
            progress.set_postfix(loss=f"{sums['loss'] / sums['images']:.4f}",
                                 **{objective.score_name: f"{sums['score'] / sums['images']:.3f}"},
                                 img_s=f"{sums['images'] / elapsed:.0f}")
        if config.checkpoint_every and state.global_step % config.checkpoint_every == 0 \
                and state.step_in_epoch < steps_per_epoch:
            state.epoch_sums = {**sums, "seconds": elapsed}
            state.save(model, optimizer)
    progress.close()
    seconds = sums["seconds"] + time.perf_counter() - started
    images = max(1, sums["images"])
    state.history.append({
        "epoch": state.epoch + 1,
        "loss": sums["loss"] / images,
        objective.score_name: sums["score"] / images,
        "lr": lr,
        "images_per_second": sums["images"] / seconds if seconds > 0 else 0.0,
    })
    log.info("%s epoch %d: loss %.4f, %s %.3f, %.0f images/s", objective.name, state.epoch + 1,
             state.history[-1]["loss"], objective.score_name, state.history[-1][objective.score_name],
             state.history[-1]["images_per_second"])


def train_step(
    model: Student,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: dict[str, Any],
    anchors: torch.Tensor,
    device: torch.device,
    precision: str = "bf16",
) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (channels_last; bf16 autocast on GPU and native-bf16 CPUs)."""
    # uint8 views; the model normalises them (normalize_pixels keeps channels_last)
    pixels = batch["pixels"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device, precision, cpu=True):
        output = model(pixels)
    terms = objective.loss(output.float(), {**to_device(batch, device), "anchors": anchors})
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return terms


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def write_outputs(config: Any, objective: Objective, model: Student, history: list[dict[str, float]],
                  metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    """The final checkpoint, metrics JSON, per-epoch CSV and resolved config of a training stage.

    `config` is a DistillConfig or SupervisedConfig (both have out, metrics, plot and train).
    """
    save_checkpoint(config.out, {
        "model": objective.model_spec,
        "state_dict": model.cpu().state_dict(),
        "image_size": config.train.image_size,
        "params": to_dict(config),
        "metrics": metrics,
        **extra,
    })
    write_json(config.metrics, metrics)
    write_history_csv(config.plot, history)
    write_resolved(config, Path(config.out).with_suffix(".config.json"))


def write_history_csv(path: str | Path, history: list[dict[str, float]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
