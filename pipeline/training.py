"""Training against the cache: view replay, the epoch loop, schedules, checkpoints and resume.

Distillation and the supervised reference share all of it; they differ only in the head
and the loss (an `Objective`). Every epoch, each image uses one of its V stored views, a
deterministic function of (seed, epoch, image), replayed with the same `apply_view` as
stage one at the student's resolution. Each worker opens the HDF5 file itself and reads a
shard's targets in one slice. Checkpoints are written atomically every epoch (and every N
steps); rerunning the same command resumes and, on CPU, ends with the same weights.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import itertools
import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import decoding, distributed, faults, precision, preemption
from pipeline.atomic import OutputLock, atomic_path, write_json
from pipeline.cache import ShardTargets, TeacherCache, dense_similarities
from pipeline.config import TrainConfig, to_dict, write_resolved
from pipeline.errors import PipelineError, reason
from pipeline.progress import Progress
from pipeline.shards import (
    MixedBatches,
    Sample,
    SharedPosition,
    check_shared_memory,
    loader_batches,
    make_loader,
)
from pipeline.student import Student, build_student, save_checkpoint, student_input, student_on
from pipeline.teacher import resolve_device
from pipeline.views import apply_view

log = logging.getLogger(__name__)

MIN_BATCH = 2  # BatchNorm needs two samples; a one-image shard tail is skipped


def epoch_view(seed: int, epoch: int, shard: int, views_per_image: int) -> int:
    """The stored view every image of a shard uses in an epoch: (epoch + a seeded shard offset) mod V.

    Each image goes through its V views in turn, each once per V epochs (the views are
    independent draws, so taking the same index for a whole shard changes nothing about what
    an image sees), and an epoch reads one contiguous block of rows per shard.
    """
    offset = int(np.random.default_rng([seed, shard]).integers(views_per_image))
    return (epoch + offset) % views_per_image


@dataclass
class ShardReplay:
    targets: ShardTargets  # this epoch's view of every image of the shard
    row_of_position: dict[int, int]
    pair: ShardTargets | None = None  # the next stored view of every image (`pairs`), rows as `targets`


class ReplayViews:
    """prepare/shard_context for ShardBatches: replays one stored view per image per epoch.

    Targets leave the worker as stored (float16, or top-k values and anchor indices): half the
    bytes of float32 through shared memory and to the device, a fraction with top-k; the
    training step widens them on its device (`dense_targets`). `epoch` is an int or the run's
    `SharedPosition`, which persistent DataLoader workers read at each new epoch.
    """

    def __init__(self, cache: TeacherCache, seed: int, epoch: int | SharedPosition, image_size: int,
                 with_targets: bool, with_embeddings: bool = False, pairs: bool = False,
                 on_device: bool = False) -> None:
        self.cache, self.seed = cache, seed
        self.position = epoch if isinstance(epoch, SharedPosition) else SharedPosition(epoch)
        self.image_size, self.with_targets = image_size, with_targets
        self.with_embeddings, self.pairs = with_embeddings, pairs
        self.on_device = on_device  # `--decode device`: send the encoded image and the view parameters

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def context(self, shard: int) -> ShardReplay:
        view = epoch_view(self.seed, self.epoch, shard, self.cache.header.views_per_image)
        targets = self.cache.shard_targets(shard, view, self.with_embeddings, expand=False)
        pair = None
        if self.pairs:  # the view after this epoch's (SSL baselines: two views of each image a step)
            pair = self.cache.shard_targets(shard, (view + 1) % self.cache.header.views_per_image, expand=False)
        return ShardReplay(targets, targets.row_of_position(), pair)

    def __call__(self, sample: Sample, replay: ShardReplay) -> dict[str, torch.Tensor]:
        row = replay.row_of_position.get(sample.position)
        if row is None:
            raise PipelineError(
                f"{self.cache.path}: has no rows for sample {sample.key}; the cache was made from "
                f"other shards, re-run precompute"
            )
        if self.on_device:  # the training device decodes and cuts the views (pipeline.decoding)
            prepared = {decoding.BYTES: decoding.encoded(sample.jpeg),
                        "view": decoding.view_row(replay.targets.params[row])}
            if replay.pair is not None:
                prepared["view_pair"] = decoding.view_row(replay.pair.params[row])
        else:
            prepared = {"pixels": apply_view(sample.image, replay.targets.params[row], self.image_size)}
            if replay.pair is not None:
                prepared["pixels_pair"] = apply_view(sample.image, replay.pair.params[row], self.image_size)
        if self.with_targets:
            prepared["targets"] = torch.from_numpy(replay.targets.similarities[row])
            if replay.targets.topk_index is not None:
                prepared["target_anchors"] = torch.from_numpy(replay.targets.topk_index[row].astype(np.int32))
        if self.with_embeddings:
            prepared["teacher_embeddings"] = torch.from_numpy(replay.targets.embeddings[row])
        return prepared


def dense_targets(batch: dict[str, Any], num_anchors: int) -> dict[str, Any]:
    """The batch (on its device) with float32 targets over every anchor and float32 embeddings."""
    batch = dict(batch)
    if "targets" in batch:
        batch["targets"] = dense_similarities(batch["targets"], batch.pop("target_anchors", None), num_anchors)
    if "teacher_embeddings" in batch:
        batch["teacher_embeddings"] = batch["teacher_embeddings"].float()
    return batch


@dataclass
class Objective:
    """What a training run optimises: the model's head and the loss on a batch."""

    name: str
    model_spec: dict[str, Any]
    loss: Callable[[torch.Tensor, dict[str, Any]], dict[str, torch.Tensor]]
    needs_targets: bool
    score_name: str  # the per-batch quality term reported beside the loss
    needs_embeddings: bool = False  # the cached teacher image embeddings of the views
    # two stored views of each image per step (`pixels`, `pixels_pair`), stacked into one forward
    needs_pairs: bool = False
    # the module trained from model_spec (default: the Student), and what it does after each
    # optimiser step (called with the module, the global step taken and the run's total steps)
    build: Callable[[dict[str, Any]], torch.nn.Module] | None = None
    after_step: Callable[[torch.nn.Module, int, int], None] | None = None


def batches_per_epoch(image_counts: np.ndarray, batch_size: int) -> int:
    return int(sum(math.ceil(int(c) / batch_size) for c in image_counts))


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to base_lr, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def decay_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay_names: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Optimiser groups: weight decay on weight matrices and convolutions only, not on norms,
    biases, scalars, nor on parameters whose name contains one of `no_decay_names`."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        matrix = parameter.ndim >= 2 and not any(part in name for part in no_decay_names)
        (decay if matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel over all parameters) or SGD (nesterov) over `decay_groups`.

    Fused AdamW, measured on this project's 2-core CPU for a ResNet-18: 5.9 ms a step against
    33.5 ms for the default per-parameter loop (21.1 foreach), 12% of a batch-64 training step at 64 px.
    """
    groups = decay_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


class RunState:
    """Everything needed to continue a run: weights, optimiser, loss scale, position, history."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.epoch_sums: dict[str, float] = {}

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None = None) -> bool:
        if not self.path.is_file():
            return False
        try:  # weights_only=True: a pickle that would run code is refused, never executed
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            fingerprint = state["fingerprint"]
        except (KeyError, RuntimeError, OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
            raise PipelineError(f"{self.path}: not a checkpoint of this run ({reason(err)}); delete it to start over") \
                from None
        if fingerprint != self.fingerprint:
            log.warning("%s: written with other settings; starting over", self.path)
            return False
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.history = json.loads(state["history"])
        self.epoch_sums = json.loads(state["epoch_sums"])
        return True

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None = None) -> None:
        save_checkpoint(self.path, {
            "fingerprint": self.fingerprint,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": json.dumps(self.history),
            "epoch_sums": json.dumps(self.epoch_sums),
        })


#: Settings that change how a run is watched or how long it waits, not what it computes: a
#: resumed run may change them.
NOT_FINGERPRINTED = ("sync_every", "collective_timeout")


def train(
    config: TrainConfig,
    objective: Objective,
    cache: TeacherCache,
    shards: list[Path],
    run_dir: Path,
    extra_fingerprint: dict[str, Any],
) -> tuple[Student, list[dict[str, float]]]:
    """Train `objective` for config.epochs; resumable from run_dir/last.pt. Returns model, history.

    Under torchrun: DistributedDataParallel over the processes (NCCL on GPUs, gloo on CPUs);
    `batch_size` is per process, so the global batch is batch_size x processes, and `lr`
    applies to that global batch as given. Every process runs the same number of steps per
    epoch, ceil(images / global batch); rank 0 writes the checkpoints, and the per-epoch
    metrics are summed over all processes.
    """
    if config.epochs < 1 or config.batch_size < MIN_BATCH:
        raise PipelineError("options --epochs must be >= 1 and --batch-size >= 2")
    if config.prefetch < 1 or config.mix_shards < 1:
        raise PipelineError("options --prefetch and --mix-shards must be at least 1")
    faults.planned()  # a wrong CSM_DISTILL_FAULT is refused before any work
    process = distributed.start(resolve_device(config.device),
                                timeout=datetime.timedelta(minutes=config.collective_timeout))
    device = distributed.local_device(resolve_device(config.device), process)
    chosen = precision.for_device(config.precision, device)
    precision.configure(chosen, training=True, deterministic=config.deterministic)
    log.info("%s on %s: %s%s%s", objective.name, device_name(device), describe(chosen),
             ", torch.compile" if config.compile else "", ", deterministic kernels" if config.deterministic else "")
    torch.manual_seed(config.seed)  # every process starts from the same weights
    model = student_on((objective.build or build_student)(objective.model_spec), device)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(cache.num_images / (config.batch_size * process.world))
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    settings = {k: v for k, v in to_dict(config).items() if k not in NOT_FINGERPRINTED}
    fingerprint = json.dumps({"train": settings, "objective": objective.name,
                              "model": objective.model_spec, "cache": cache.header.to_attrs(),
                              "processes": process.world, **extra_fingerprint}, sort_keys=True)
    with OutputLock(run_dir) if process.main else contextlib.nullcontext():
        run = Run(config, objective, cache, model, optimizer, chosen, process, device,
                  steps_per_epoch, total_steps, warmup_steps)
        return run.train(shards, RunState(run_dir / "last.pt", fingerprint))


def device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def describe(chosen: precision.Precision) -> str:
    """The arithmetic in words, for the start line of a run."""
    if chosen.autocast_dtype is None:
        return f"{chosen.name} (no autocast)"
    scaled = ", loss scaling" if chosen.scaler else ""
    tf32 = ", TF32 for float32 ops" if chosen.tf32 else ""
    return f"{chosen.name} autocast{scaled}{tf32}"


class Run:
    """A training run's fixed parts (model, optimiser, arithmetic, schedule) and its epochs."""

    def __init__(self, config: TrainConfig, objective: Objective, cache: TeacherCache, model: Student,
                 optimizer: torch.optim.Optimizer, chosen: precision.Precision, process: distributed.Process,
                 device: torch.device, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> None:
        self.config, self.objective, self.cache = config, objective, cache
        self.model, self.optimizer, self.precision = model, optimizer, chosen
        self.process, self.device = process, device
        self.steps_per_epoch, self.total_steps, self.warmup_steps = steps_per_epoch, total_steps, warmup_steps
        self.scaler = precision.grad_scaler(chosen, device)

    def train(self, shards: list[Path], state: RunState) -> tuple[Student, list[dict[str, float]]]:
        """The epochs, from where `state` (run_dir/last.pt) left off, while this process holds
        the run directory's lock."""
        config, process, model = self.config, self.process, self.model
        if state.load(model, self.optimizer, self.scaler):
            log.info("resuming %s at epoch %d, step %d", self.objective.name, state.epoch + 1, state.step_in_epoch)
            if not process.main:
                state.epoch_sums = {}  # rank 0 carries the interrupted epoch's sums (already summed over ranks)
        stepped: torch.nn.Module = model
        if process.distributed:
            stepped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            log.info("%d processes (%s): global batch %d = %d x %d, %d steps per epoch", process.world,
                     torch.distributed.get_backend(), config.batch_size * process.world, config.batch_size,
                     process.world, self.steps_per_epoch)
        if config.compile:
            stepped = torch.compile(stepped)
        loader = TrainLoader(config, self.cache, self.objective, shards, process, self.device)
        anchors = self.cache.anchors().to(self.device)
        with preemption.StopSignals() as signals:
            vote = preemption.StopVote(signals, self.device)
            try:
                while state.epoch < config.epochs:
                    self.train_one_epoch(stepped, loader, anchors, state, vote)
                    state.epoch += 1
                    state.step_in_epoch, state.epoch_sums = 0, {}
                    if process.main:
                        state.save(model, self.optimizer, self.scaler)
                    distributed.barrier()
                    faults.kill_after("step", state.global_step)  # test hook: after an epoch and its checkpoint
                    signum = vote.settle()
                    if signum and state.epoch < config.epochs:
                        raise self.stopped(signum, state)
            except preemption.Stopped:
                distributed.stop()
                raise
            finally:
                loader.close()
        distributed.stop()
        return model.eval(), state.history

    def stopped(self, signum: int, state: RunState) -> preemption.Stopped:
        """After the checkpoint of a run stopped by a signal: every rank waits for rank 0's
        checkpoint to be on disk, rank 0 logs the line."""
        distributed.barrier()
        if self.process.main:
            log.warning("stopped by %s at epoch %d, step %d (checkpoint %s); run the same command to resume",
                        preemption.name(signum), state.epoch + 1, state.step_in_epoch, state.path)
        return preemption.Stopped(signum)

    def save_within_epoch(self, stepped: torch.nn.Module, state: RunState, sums: dict[str, float],
                          started: float) -> None:
        """A checkpoint in the middle of an epoch, with the epoch's sums so far over all ranks."""
        totals = distributed.sum_across([sums["loss"], sums["score"], sums["images"]], self.device)
        if self.process.main:
            state.epoch_sums = {**sums, "loss": totals[0], "score": totals[1], "images": totals[2],
                                "seconds": sums["seconds"] + time.perf_counter() - started}
            state.save(model_of(stepped), self.optimizer, self.scaler)

    def train_one_epoch(self, stepped: torch.nn.Module, loader: TrainLoader, anchors: torch.Tensor,
                        state: RunState, vote: preemption.StopVote) -> None:
        """One epoch, from `state.step_in_epoch` (a resumed epoch replays its batch order up to it).

        The loop never waits for the device except every `sync_every` steps, at checkpoints and
        at the epoch's end: the loss sums stay on the device (float64, as the host summed them)
        and are read back then, for the progress line and the finite check. A stop signal
        (`vote`) ends the epoch after the step in progress with a checkpoint of it; at the
        epoch's last step the epoch's own checkpoint serves (`train`).
        """
        config, objective = self.config, self.objective
        stepped.train()
        sums = state.epoch_sums or {"loss": 0.0, "score": 0.0, "images": 0, "seconds": 0.0}
        running = Sums(objective.name, sums, self.device)
        progress = Progress(self.steps_per_epoch, f"{objective.name} {state.epoch + 1}/{config.epochs}", "step",
                            initial=state.step_in_epoch)
        started = time.perf_counter()
        lr = learning_rate(state.global_step, self.total_steps, self.warmup_steps, config.lr)
        checked_step = state.global_step
        batches = loader.epoch(state.epoch)
        for index, batch in zip(range(self.steps_per_epoch), batches, strict=False):  # batches never end
            if index < state.step_in_epoch:
                continue  # replaying the order of an interrupted epoch up to where it stopped
            lr = learning_rate(state.global_step, self.total_steps, self.warmup_steps, config.lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            faults.signal_at("step", state.global_step + 1)  # test hook: a signal while this step runs
            if config.decode == "device":  # the views of this batch, decoded and cut on the device
                batch = decoding.device_views(batch, self.device, config.image_size)
            terms = train_step(stepped, self.optimizer, objective, batch, anchors, self.device, self.precision,
                               self.scaler)
            running.add(terms["loss"], terms[objective.score_name], len(batch["keys"]))
            state.step_in_epoch += 1
            state.global_step += 1
            if objective.after_step is not None:  # e.g. BYOL's momentum target
                objective.after_step(model_of(stepped), state.global_step, self.total_steps)
            progress.update()
            checkpoint = (config.checkpoint_every and state.global_step % config.checkpoint_every == 0
                          and state.step_in_epoch < self.steps_per_epoch)
            if checkpoint or state.global_step % config.sync_every == 0:
                sums = running.read(state, checked_step, lr)  # waits for the device; refuses a non-finite loss
                checked_step = state.global_step
                elapsed = sums["seconds"] + time.perf_counter() - started
                progress.set_postfix(loss=f"{sums['loss'] / sums['images']:.4f}",
                                     **{objective.score_name: f"{sums['score'] / sums['images']:.3f}"},
                                     img_s=f"{sums['images'] * self.process.world / elapsed:.0f}")
            if checkpoint:
                self.save_within_epoch(stepped, state, sums, started)
            if state.step_in_epoch < self.steps_per_epoch:  # an epoch's last step: after the epoch's checkpoint
                faults.kill_after("step", state.global_step)  # test hook, see pipeline.faults
                signum = vote.poll()
                if signum:
                    if not checkpoint:
                        self.save_within_epoch(stepped, state, running.read(state, checked_step, lr), started)
                    batches.close()
                    progress.close()
                    raise self.stopped(signum, state)
        batches.close()
        sums = running.read(state, checked_step, lr)
        progress.close()
        seconds = sums["seconds"] + time.perf_counter() - started
        loss, score, images = distributed.sum_across([sums["loss"], sums["score"], sums["images"]], self.device)
        images = max(1.0, images)
        state.history.append({
            "epoch": state.epoch + 1,
            "loss": loss / images,
            objective.score_name: score / images,
            "lr": lr,
            "images_per_second": images / seconds if seconds > 0 else 0.0,
        })
        log.info("%s epoch %d: loss %.4f, %s %.3f, %.0f images/s", objective.name, state.epoch + 1,
                 state.history[-1]["loss"], objective.score_name, state.history[-1][objective.score_name],
                 state.history[-1]["images_per_second"])


class Sums:
    """An epoch's loss and score sums (each term x batch images) and image count, kept on the
    device between reads so that a step does not wait for the device to report its loss."""

    def __init__(self, name: str, start: dict[str, float], device: torch.device) -> None:
        self.name, self.start = name, start
        self.device = device
        self.added = torch.zeros(3, dtype=torch.float64, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor, score: torch.Tensor, images: int) -> None:
        loss, score = loss.detach().double(), score.detach().double()
        self.finite &= torch.isfinite(loss)
        self.added += torch.stack([loss * images, score * images, torch.ones_like(loss) * images])

    def read(self, state: RunState, since_step: int, lr: float) -> dict[str, float]:
        """The sums so far (one host sync). A non-finite loss since the last read stops the run
        before anything is saved: last.pt still holds the last good state."""
        loss, score, images = self.added.tolist()
        if not bool(self.finite):
            epoch_step = state.step_in_epoch - (state.global_step - since_step) + 1
            steps = (f"step {state.step_in_epoch}" if epoch_step == state.step_in_epoch
                     else f"one of steps {epoch_step}-{state.step_in_epoch}")
            raise PipelineError(
                f"{self.name}: the loss is {loss / max(images, 1)} at epoch {state.epoch + 1}, {steps} (lr {lr:.2g}); "
                f"{state.path} keeps the last good checkpoint; lower --lr, or check the cache with "
                f"`python -m pipeline inspect`"
            )
        return {**self.start, "loss": self.start["loss"] + loss, "score": self.start["score"] + score,
                "images": self.start["images"] + round(images)}


def batch_bytes(config: TrainConfig, cache: TeacherCache, objective: Objective) -> int:
    """Bytes of one training batch as the workers ship it (`training_batch_bytes` for this cache)."""
    header = cache.header
    return training_batch_bytes(config.batch_size, config.image_size, header.num_anchors, header.topk,
                                header.embed_dim, objective.needs_targets, objective.needs_embeddings,
                                objective.needs_pairs)


def training_batch_bytes(batch_size: int, image_size: int, num_anchors: int, topk: int, embed_dim: int,
                         targets: bool = True, embeddings: bool = False, pairs: bool = False) -> int:
    """Bytes of one training batch as the workers ship it: uint8 views (two per image with `pairs`),
    positions, labels and shards, targets as stored (float16 per anchor, or top-k float16 values and
    int32 anchor indices), float16 teacher embeddings. `plan` computes a run's budget with it too."""
    per_image = 3 * image_size ** 2 * (2 if pairs else 1) + 8 + 8 + 8
    if targets:
        per_image += (2 + 4) * topk if topk else 2 * num_anchors
    if embeddings:
        per_image += 2 * embed_dim
    return batch_size * per_image


class TrainLoader:
    """One DataLoader for a whole run, its workers persistent across epochs and laps.

    Each epoch (`epoch`), the run's `SharedPosition` moves to (epoch, lap) before the next
    iteration starts, and the workers, which keep their dataset, read it then: the batch
    sequence is the one fresh workers would give (what a resumed run replays), without
    starting workers, re-opening the cache and re-importing in them each epoch and lap.
    """

    def __init__(self, config: TrainConfig, cache: TeacherCache, objective: Objective, shards: list[Path],
                 process: distributed.Process, device: torch.device) -> None:
        self.config, self.process = config, process
        self.position = SharedPosition()
        on_device = config.decode == "device"
        replay = ReplayViews(cache, config.seed, self.position, config.image_size, objective.needs_targets,
                             objective.needs_embeddings, objective.needs_pairs, on_device)
        dataset = MixedBatches(shards, config.batch_size, replay, replay.context, seed=config.seed,
                               epoch=self.position, rank=process.rank, world=process.world, mix=config.mix_shards,
                               decode=not on_device)
        self.loader = make_loader(dataset, config.workers, pin_memory=device.type == "cuda",
                                  prefetch=config.prefetch, persistent=True)
        check_shared_memory(objective.name, f"--workers {config.workers} --prefetch {config.prefetch} "
                            f"--batch-size {config.batch_size}", self.loader.num_workers, config.prefetch,
                            batch_bytes(config, cache, objective), process.local_world)

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This process's batches of an epoch, endlessly: after its shards, another lap of them.

        Batches smaller than MIN_BATCH (a worker's last few images) are left out, so that every
        process takes a real step at every step of the epoch.
        """
        for lap in itertools.count():
            self.position.move_to(epoch, lap)
            produced = False
            for batch in loader_batches(self.loader):
                if len(batch["keys"]) >= MIN_BATCH:
                    produced = True
                    yield batch
            if not produced:
                raise PipelineError(f"{self.config.shards}: no decodable images for process {self.process.rank}")

    def close(self) -> None:
        """Stop the workers (they would otherwise live as long as the loader)."""
        self.loader = None


def model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a torch.compile and/or DistributedDataParallel wrapper (the model itself otherwise)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_step(
    model: Student,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: dict[str, Any],
    anchors: torch.Tensor,
    device: torch.device,
    precision_: str | precision.Precision = "bf16",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch; returns the loss terms, on the device (reading them
    waits for the device: the caller decides when).

    The batch goes to the device in one copy per tensor (non-blocking from pinned memory),
    pixels channels_last as uint8 (the model normalises them), targets as stored, widened
    there (`dense_targets`). Autocast and loss scaling as `precision_` chooses for the device.
    """
    chosen = precision_ if isinstance(precision_, precision.Precision) else precision.for_device(precision_, device)
    batch = to_device(batch, device)
    pixels = student_input(batch["pixels"], device)  # already there: only the memory format
    if "pixels_pair" in batch:  # two views of each image: one forward over [first views; second views]
        pixels = torch.cat([pixels, student_input(batch["pixels_pair"], device)])
    with precision.autocast(chosen, device):
        output = model(pixels)
    terms = objective.loss(output.float(), {**dense_targets(batch, anchors.shape[0]), "anchors": anchors})
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
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
    Under torchrun, only rank 0 writes.
    """
    if not distributed.is_main_process():
        return
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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
