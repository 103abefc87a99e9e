"""The GPU smoke test: what to run on the first GPU machine you get, before a user does.

    python scripts/gpu_smoke.py [--json FILE] [--work DIR]    # the GPU form: cuda, 224 px, a few minutes
    python scripts/gpu_smoke.py --cpu [--json FILE]           # the CPU form: tiny settings (a test runs it)

Every stage runs as users run it: `python -m pipeline STAGE` in a subprocess, every option
given explicitly, every output in a work directory (a temporary one unless `--work`), offline
(HF_HUB_OFFLINE=1). On the device (`--device`, default cuda; cpu for `--cpu`):

- the demo world's shards; precompute with an open_clip ViT-B-32 teacher at 224 px whose
  random weights are written to a checkpoint file first (no download; the CPU form: a tiny
  open_clip config, as tests/conftest.py makes); distill (ResNet-18 at 224 px); probe;
  predict (with the teacher) and export (the TorchScript file then run on the device); bench;
- resume: precompute killed after a shard (CSM_DISTILL_FAULT, pipeline/faults.py) and run
  again equals the uninterrupted cache in every dataset and passes `verify`; distill killed
  mid-epoch and run again ends with the uninterrupted run's weights, bit for bit (on a GPU
  both runs use --deterministic, without which GPU kernels do not repeat bit for bit);
- two ranks: distill under torchrun (NCCL) when 2+ GPUs are visible; skipped, with a line
  saying so, otherwise;
- ratios, each measured in this run (speed over speed: above 1 the first is faster):
  precompute over the bare teacher forward (bench's JSON), distill's last epoch over the
  student's pure compute (distill's step loop on one batch already on the device), that
  loop reading `loss.item()` every step over reading it only at the end (the cost of host
  syncs), a pinned over a pageable host-to-device copy of one batch of uint8 224 px views,
  and the student step in TF32 over fp32 (the last two "n/a on cpu").

Each step prints a line when it starts and when it ends (with its wall time); the first
failing check prints `FAIL <step>: <what>` (and the end of the command's log) and the
script exits with code 1, keeping the work directory. At the end a summary table, also
written as JSON with `--json`: device, torch version, every step's wall time and result,
the ratios and the figures behind them.

The sizes are chosen by arithmetic to stay well under 10 minutes on one H100: most of the
time goes to the ~15 process start-ups (~10-20 s each); the model work itself is seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"

NA_ON_CPU = "n/a on cpu"  # no pinned memory without CUDA
TF32_NA_ON_CPU = "n/a on cpu (tf32 runs as fp32 there)"

# The CPU form's teacher: a tiny open_clip CLIP (32 px images, 32-d embeddings), like tests/conftest.py's.
TINY_TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@dataclass(frozen=True)
class Form:
    """The sizes of one form of the smoke test."""

    name: str
    device: str
    teacher: str  # an open_clip model name (random weights), or "" for TINY_TEACHER
    train_images: int
    val_images: int
    image_size: int  # of the demo images and of the student's input
    images_per_shard: int
    views: int
    precompute_batch: int
    batch_size: int
    epochs: int
    checkpoint_every: int  # of the killed and resumed runs (the timed distill run checkpoints per epoch only)
    kill_after_shard: int
    kill_after_step: int  # after a mid-epoch checkpoint, so that the resumed run replays steps
    workers: int  # DataLoader workers of every stage (and processes writing the shards)
    bench_steps: int
    bench_views: int
    warmup_steps: int  # untimed steps before each measurement (bench's and the in-process ones)
    timed_steps: int  # per measurement of the in-process ratios
    command_timeout: int  # seconds; a command still running then counts as hung


# 1024 images at 224 px in 16 shards: ViT-B-32 encodes the 4096 views in ~1 s (3000-5000 views/s
# in bf16), ResNet-18 trains 3 epochs in ~1.5 s (2000-3000 images/s): the stages' own work is
# seconds, their start-ups (~10-20 s each) are most of the ~6 minutes (see the report's budget).
GPU = Form(name="gpu", device="cuda", teacher="ViT-B-32", train_images=1024, val_images=256, image_size=224,
           images_per_shard=64, views=4, precompute_batch=256, batch_size=128, epochs=3, checkpoint_every=5,
           kill_after_shard=3, kill_after_step=12, workers=8, bench_steps=10, bench_views=8, warmup_steps=3,
           timed_steps=20, command_timeout=300)
# 64 images at 32 px in 4 shards; 2 epochs of 4 steps; no DataLoader workers (params.yaml's CPU setting).
CPU = Form(name="cpu", device="cpu", teacher="", train_images=64, val_images=32, image_size=32,
           images_per_shard=16, views=2, precompute_batch=64, batch_size=16, epochs=2, checkpoint_every=3,
           kill_after_shard=2, kill_after_step=7, workers=0, bench_steps=2, bench_views=2, warmup_steps=1,
           timed_steps=4, command_timeout=180)

STUDENT = "resnet18"
PRECISION = "bf16"  # what params.yaml runs: bf16 autocast on GPUs (and CPUs) that have it natively


class Failure(Exception):
    """A failed check: what failed, and the log that says more (if a command ran)."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


def options(values: dict[str, Any]) -> list[str]:
    """`--name value` for each entry (underscores as dashes); booleans as `--name` / `--no-name`."""
    args = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Smoke:
    """The work directory, the commands run in it, and what they measured."""

    def __init__(self, form: Form, device: str, work: Path) -> None:
        self.form, self.device, self.work = form, device, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.steps: dict[str, dict[str, Any]] = {}
        self.ratios: dict[str, float | str] = {}
        self.figures: dict[str, Any] = {}
        self.teacher: dict[str, str] = {}
        self.shards, self.cache = work / "shards", work / "cache" / "teacher.h5"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop("CSM_DISTILL_FAULT", None)

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[dict[str, Any]]:
        """Time one step; the body may set `result` in the dict it gets (a short line)."""
        print(f"[{clock(time.perf_counter() - self.started)}] {name}: {what}", flush=True)
        record: dict[str, Any] = {"result": "ok"}
        begun = time.perf_counter()
        try:
            yield record
        except Exception:
            self.steps[name] = {"seconds": round(time.perf_counter() - begun, 2), "result": "FAILED"}
            raise
        record["seconds"] = round(time.perf_counter() - begun, 2)
        self.steps[name] = {"seconds": record["seconds"], "result": record["result"]}
        print(f"[{clock(time.perf_counter() - self.started)}] {name}: {record['result']} "
              f"({record['seconds']:.1f} s)", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.steps[name] = {"seconds": 0.0, "result": f"skipped: {why}"}
        print(f"[{clock(time.perf_counter() - self.started)}] {name}: skipped: {why}", flush=True)

    def command(self, name: str, args: list[str], fault: str = "", launcher: list[str] | None = None) -> str:
        """Run `python -m pipeline ARGS` (under `launcher`, e.g. torchrun, if given) from the project
        root; returns its output. With `fault`, the run must die by its own SIGKILL (pipeline.faults);
        otherwise it must exit with 0. A command still running after the form's timeout is a hang."""
        log = self.logs / f"{len(list(self.logs.iterdir())):02d}-{name}.log"
        argv = [*(launcher or [sys.executable]), "-m", "pipeline", *args]
        env = {**self.env, "CSM_DISTILL_FAULT": fault} if fault else self.env
        with open(log, "w") as out:
            out.write(("CSM_DISTILL_FAULT=" + fault + " " if fault else "") + shlex.join(argv) + "\n\n")
            out.flush()
            # its own session: its DataLoader workers, or a killed run's orphaned ones, are stopped with it
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=self.form.command_timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                with_group_stopped(process.pid)
            if code is None:
                process.wait()
        if code is None:
            raise Failure(f"still running after {self.form.command_timeout} s (a hang?); stopped", log)
        if fault and code != -signal.SIGKILL:
            raise Failure(f"CSM_DISTILL_FAULT={fault}: expected the run to kill itself, it exited with {code}", log)
        if not fault and code != 0:
            raise Failure(f"exit code {code}", log)
        return log.read_text(errors="replace")

    # ------------------------------------------------------------------ the stages

    def make_shards(self) -> None:
        f = self.form
        with self.step("shards", f"{f.train_images} train / {f.val_images} val demo images at {f.image_size} px") \
                as record:
            self.command("shards", ["shards", *options({
                "source": "demo", "out": self.shards, "train": f.train_images, "val": f.val_images,
                "image_size": f.image_size, "max_per_shard": f.images_per_shard, "seed": 0,
                "workers": max(1, f.workers)})])
            manifest = json.loads((self.shards / "manifest.json").read_text())
            counts = {split: manifest["splits"][split]["samples"] for split in ("train", "val")}
            if counts != {"train": f.train_images, "val": f.val_images}:
                raise Failure(f"manifest.json counts {counts}, expected {f.train_images} train / {f.val_images} val")
            record["result"] = f"ok: {len(list(self.shards.glob('train-*.tar')))} train shards"

    def make_teacher(self) -> None:
        """A teacher checkpoint file with random weights: the stages load it as they load real weights."""
        directory = self.work / "teacher"
        directory.mkdir(exist_ok=True)
        name = self.form.teacher or "tiny-clip"
        with self.step("teacher", f"random-weight open_clip {name} written as a checkpoint file") as record:
            import open_clip
            import torch
            from safetensors.torch import save_file

            if self.form.teacher:
                self.teacher = {"teacher_model": name, "teacher_config": ""}
            else:
                config = directory / f"{name}.json"
                config.write_text(json.dumps(TINY_TEACHER))
                open_clip.add_model_config(config)
                self.teacher = {"teacher_model": "", "teacher_config": str(config)}
            torch.manual_seed(0)
            model = open_clip.create_model(name)  # no pretrained tag: random weights, nothing downloaded
            weights = directory / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            self.teacher.update(teacher_pretrained="", teacher_checkpoint=str(weights))
            record["result"] = f"ok: {weights.stat().st_size / 1e6:.0f} MB"

    def precompute_args(self, out: Path) -> list[str]:
        f = self.form
        return ["precompute", *options({
            "shards": self.shards, "out": out, "metrics": out.with_suffix(".metrics.json"), "views": f.views,
            "batch_size": f.precompute_batch, "workers": f.workers, "device": self.device, "precision": PRECISION,
            "seed": 0, "topk": 0, **self.teacher})]

    def precompute(self) -> None:
        with self.step("precompute", f"{self.form.views} views per image, teacher on {self.device}") as record:
            self.command("precompute", self.precompute_args(self.cache))
            metrics = json.loads(self.cache.with_suffix(".metrics.json").read_text())
            self.figures["precompute_images_per_second"] = metrics["images_per_second"]
            record["result"] = f"ok: {metrics['images']} images, {metrics['images_per_second']:.0f} images/s"

    def decode_on_device(self) -> None:
        """precompute and distill with --decode device: on a GPU the one nvjpeg call (batched
        decode_jpeg on cuda); on the CPU the cache must be the CPU-decoded one, bit for bit."""
        out = self.work / "cache-decode-device" / "teacher.h5"
        with self.step("decode_device", f"precompute and 1 epoch of distill with --decode device on {self.device}") \
                as record:
            self.command("precompute_decode_device", [*self.precompute_args(out), "--decode", "device"])
            different = cache_differences(self.cache, out)
            if different and self.device == "cpu":
                raise Failure(f"{out} differs from the CPU-decoded {self.cache} in: {', '.join(different[:6])}")
            self.command("distill_decode_device", self.distill_args("distill-decode-device", decode="device",
                                                                    epochs=1))
            last = last_epoch(self.work / "distill-decode-device" / "plot.csv")
            record["result"] = ("ok: the same cache as --decode cpu" if not different else
                                f"ok: nvjpeg's cache differs from libjpeg-turbo's in {', '.join(different[:3])}")
            record["result"] += f"; distill {last['images_per_second']:.0f} images/s"

    def distill_args(self, name: str, **changes: Any) -> list[str]:
        out = self.work / name
        return ["distill", *options({**self.train_options(), "out": out / "student.pt", "run_dir": out / "run",
                                     "metrics": out / "metrics.json", "plot": out / "plot.csv",
                                     **self.teacher, **changes})]

    def train_options(self) -> dict[str, Any]:
        """The train section as every training stage here runs it (also the in-process measurements)."""
        f = self.form
        return {"shards": str(self.shards), "cache": str(self.cache), "arch": STUDENT, "image_size": f.image_size,
                "epochs": f.epochs, "batch_size": f.batch_size, "workers": f.workers, "device": self.device,
                "precision": PRECISION, "checkpoint_every": 0, "seed": 0}

    def distill(self) -> None:
        f = self.form
        with self.step("distill", f"{STUDENT} at {f.image_size} px, {f.epochs} epochs of batch {f.batch_size}") \
                as record:
            self.command("distill", self.distill_args("distill"))
            last = last_epoch(self.work / "distill" / "plot.csv")
            self.figures["distill_images_per_second"] = last["images_per_second"]
            record["result"] = f"ok: loss {last['loss']:.4f}, {last['images_per_second']:.0f} images/s (last epoch)"

    def probe(self) -> None:
        f = self.form
        out = self.work / "probe"
        with self.step("probe", "linear probe and zero-shot of teacher and student") as record:
            self.command("probe", ["probe", *options({
                "shards": self.shards, "cache": self.cache, "student": self.work / "distill" / "student.pt",
                "supervised": "", "out": out / "probe.json", "plots": out, "distill_csv": self.work / "distill" /
                "plot.csv", "batch_size": 2 * f.batch_size, "workers": f.workers, "device": self.device,
                "precision": PRECISION, **self.teacher})])
            metrics = json.loads((out / "probe.json").read_text())
            record["result"] = (f"ok: student linear top-1 {metrics['student']['linear_top1']}, teacher "
                                f"{metrics['teacher']['linear_top1']} (random weights: chance level)")

    def predict(self) -> None:
        images = val_images(self.shards, self.work / "images", 4)
        out = self.work / "predict.json"
        with self.step("predict", f"{len(images)} val images, student and teacher") as record:
            self.command("predict", ["predict", *map(str, images), *options({
                "student": self.work / "distill" / "student.pt", "cache": self.cache, "shards": self.shards,
                "json": out, "device": self.device, "teacher": True, **self.teacher})])
            predictions = json.loads(out.read_text())["predictions"]
            unread = [p["file"] for p in predictions if "error" in p]
            if len(predictions) != len(images) or unread:
                raise Failure(f"{out}: {len(predictions)} predictions for {len(images)} images, unread: {unread}")
            record["result"] = f"ok: {len(predictions)} predictions"

    def export(self) -> None:
        import torch

        out = self.work / "export"
        with self.step("export", f"TorchScript and ONNX, the TorchScript file then run on {self.device}") as record:
            self.command("export", ["export", *options({
                "out": out, "student": self.work / "distill" / "student.pt", "cache": self.cache,
                "shards": self.shards, **self.teacher})])
            with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export: what export writes
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(out / "student.torchscript.pt"), map_location=self.device)
            size = json.loads((out / "classes.json").read_text())["image_size"]
            pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, device=self.device)
            with torch.no_grad():
                embeddings = model(pixels).float().cpu()
            norms = embeddings.norm(dim=-1)
            if not bool(torch.isfinite(embeddings).all()) or not torch.allclose(norms, torch.ones(2), atol=1e-3):
                raise Failure(f"{out / 'student.torchscript.pt'} on {self.device}: embedding norms {norms.tolist()}, "
                              f"expected finite unit vectors")
            record["result"] = f"ok: TorchScript on {self.device} gives {tuple(embeddings.shape)} unit embeddings"

    def bench(self) -> None:
        f = self.form
        out = self.work / "bench.json"
        with self.step("bench", f"plain, cached and online training; bare teacher vs precompute "
                                f"({f.bench_views} views)") as record:
            self.command("bench", ["bench", *options({
                **self.train_options(), "steps": f.bench_steps, "warmup_steps": f.warmup_steps, "views": f.bench_views,
                "precompute_shards": f.train_images // f.images_per_shard, "topk": 16, "random_teacher": False,
                "measure_rss": False, "data_path_images": 8, "json": out, **self.teacher})])
            result = json.loads(out.read_text())
            self.ratios["precompute_over_teacher"] = result["precompute_over_teacher"]
            self.figures.update({f"bench_{key}": result[key] for key in (
                "teacher_views_per_second", "precompute_views_per_second", "cached_over_plain",
                "plain_images_per_second", "cached_images_per_second", "online_images_per_second")})
            record["result"] = (f"ok: precompute/teacher {result['precompute_over_teacher']:.2f}, "
                                f"cached/plain {result['cached_over_plain']:.2f}")

    # ------------------------------------------------------------------ ratios measured in this process

    def measure_ratios(self) -> None:
        import torch

        from pipeline.cache import TeacherCache
        from pipeline.config import load_config, override

        device = torch.device(self.device)
        config = override(load_config("distill", PARAMS), {f"train.{k}": v for k, v in self.train_options().items()})
        steps = self.form.timed_steps
        with self.step("ratios", f"fixed-batch student steps, host syncs, copies, fp32/tf32 on {self.device}") \
                as record:
            rates = student_rates(FixedBatchStudent(config, TeacherCache(self.cache).anchors(), device,
                                                    self.form.warmup_steps), steps)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the student's memory back to the stages that run next
            self.figures.update({f"student_{name}_images_per_second": rate for name, rate in rates.items()})
            self.ratios["distill_over_student_compute"] = self.figures["distill_images_per_second"] / rates["compute"]
            self.ratios["item_every_step_over_end_only"] = rates["item_every_step"] / rates["compute"]
            if device.type == "cuda":
                copies = copy_rates(self.form.batch_size, device, 4 * steps)
                self.figures.update({f"copy_{name}_gb_per_second": rate for name, rate in copies.items()})
                self.ratios["pinned_over_pageable"] = copies["pinned"] / copies["pageable"]
                self.ratios["tf32_over_fp32"] = rates["tf32"] / rates["fp32"]
            else:
                self.ratios["pinned_over_pageable"] = NA_ON_CPU
                self.ratios["tf32_over_fp32"] = TF32_NA_ON_CPU
            record["result"] = f"ok: student compute {rates['compute']:.0f} images/s"

    # ------------------------------------------------------------------ resume and two ranks

    def precompute_resume(self) -> None:
        out = self.work / "cache-resumed" / "teacher.h5"
        shards = len(list(self.shards.glob("train-*.tar")))
        n = self.form.kill_after_shard
        with self.step("precompute_killed", f"killed after shard {n} of {shards}"):
            self.command("precompute_killed", self.precompute_args(out), fault=f"kill-after-shard:{n}")
            parts = sorted(p.name for p in (out.parent / (out.name + ".parts")).glob("part-*.h5"))
            if len(parts) != n or out.exists():
                raise Failure(f"after the kill: {len(parts)} part files (expected {n}), cache file "
                              f"{'written' if out.exists() else 'absent'} (expected absent)")
        with self.step("precompute_resumed", "the same command again") as record:
            output = self.command("precompute_resumed", self.precompute_args(out))
            if f"resuming: {n} of {shards} shards already done" not in output:
                raise Failure(f"no line 'resuming: {n} of {shards} shards already done' in the log", self.last_log())
            different = cache_differences(self.cache, out)
            if different:
                raise Failure(f"{out} differs from the uninterrupted {self.cache} in: {', '.join(different[:6])}")
            record["result"] = "ok: equal to the uninterrupted cache in every dataset and attribute"
        with self.step("verify", "verify the resumed cache") as record:
            output = self.command("verify", ["verify", str(out)])
            if "every checksum matches" not in output:
                raise Failure("no line 'every checksum matches' in the log", self.last_log())

    def distill_resume(self) -> None:
        """Killed after a step past a mid-epoch checkpoint, run again: the same weights as a run not killed.
        On a GPU both runs use --deterministic (and the uninterrupted one is run here for it)."""
        f = self.form
        n = f.kill_after_step
        changes = {"checkpoint_every": f.checkpoint_every}  # does not change the weights
        if self.device != "cpu":
            changes["deterministic"] = True
        reference = "distill"
        if "deterministic" in changes:
            reference = "distill_deterministic"
            with self.step(reference, "--deterministic, not killed: the reference"):
                self.command(reference, self.distill_args(reference, **changes))
        else:
            self.skip("distill_deterministic", "cpu runs are deterministic: distill's run is the reference")
        with self.step("distill_killed", f"killed after step {n} of {self.steps_per_epoch() * f.epochs}"):
            self.command("distill_killed", self.distill_args("distill-resumed", **changes),
                         fault=f"kill-after-step:{n}")
        with self.step("distill_resumed", "the same command again") as record:
            output = self.command("distill_resumed", self.distill_args("distill-resumed", **changes))
            if "resuming distill at epoch" not in output:
                raise Failure("no line 'resuming distill at epoch ...' in the log", self.last_log())
            different = weight_differences(self.work / reference / "student.pt",
                                           self.work / "distill-resumed" / "student.pt")
            if different:
                raise Failure(f"the resumed run's weights are not the run not killed's ({reference}), bit for bit: "
                              f"{different}")
            record["result"] = ("ok: the weights of the run not killed, bit for bit"
                                + (" (--deterministic)" if "deterministic" in changes else ""))

    def distill_two_ranks(self) -> None:
        import torch

        gpus = torch.cuda.device_count() if self.device.startswith("cuda") else 0
        if gpus < 2:
            self.skip("distill_2rank", f"needs 2+ GPUs, {gpus} visible (CPU ranks: tests/test_distributed.py)")
            return
        with self.step("distill_2rank", f"torchrun --nproc-per-node 2 (NCCL), {gpus} GPUs visible") as record:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            output = self.command("distill_2rank", self.distill_args("distill-2rank"), launcher=launcher)
            if "2 processes (nccl)" not in output:
                raise Failure("no line '2 processes (nccl): ...' in the log: not NCCL data parallel?",
                              self.last_log())
            last = last_epoch(self.work / "distill-2rank" / "plot.csv")
            record["result"] = f"ok: loss {last['loss']:.4f}, {last['images_per_second']:.0f} images/s (2 ranks)"
            if "Grad strides do not match bucket view strides" in output:  # a copy of every gradient, every step
                record["result"] += "; DDP warned: grad strides do not match bucket view strides"

    def steps_per_epoch(self) -> int:
        return -(-self.form.train_images // self.form.batch_size)

    def last_log(self) -> Path:
        return sorted(self.logs.iterdir())[-1]

    def summary(self, passed: bool, failed: str = "") -> dict[str, Any]:
        import torch

        return {
            "form": self.form.name,
            "passed": passed,
            "failed": failed,
            "device": device_description(self.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "seconds": round(time.perf_counter() - self.started, 1),
            "steps": self.steps,
            "ratios": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.ratios.items()},
            "figures": {k: round(v, 2) if isinstance(v, float) else v for k, v in self.figures.items()},
            "settings": {**asdict(self.form), "device": self.device, "student": STUDENT, "precision": PRECISION},
        }


RATIO_MEANINGS = {
    "precompute_over_teacher": "precompute views/s / bare teacher forward views/s (bench)",
    "distill_over_student_compute": "distill images/s (last epoch) / its step loop on one batch on the device",
    "item_every_step_over_end_only": "that loop reading loss.item() every step / only at the end",
    "pinned_over_pageable": "host->device copy of a batch of uint8 224px views, pinned / pageable",
    "tf32_over_fp32": "the student step loop, precision tf32 / fp32",
}


def print_summary(summary: dict[str, Any]) -> None:
    verdict = "passed" if summary["passed"] else f"FAILED at {summary['failed']}"
    print(f"\n{summary['form']} smoke on {summary['device']} (torch {summary['torch']}, CUDA {summary['cuda']}, "
          f"{summary['gpus']} GPUs): {verdict} in {clock(summary['seconds'])}")
    print(f"  {'step':<24} {'seconds':>8}  result")
    for name, step in summary["steps"].items():
        print(f"  {name:<24} {step['seconds']:>8.1f}  {step['result']}")
    if summary["ratios"]:
        print("ratios (each measured in this run; above 1: the first is faster)")
        for name, value in summary["ratios"].items():
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"  {name:<30} {shown:>8}  {RATIO_MEANINGS[name]}")


# ---------------------------------------------------------------------- helpers


def with_group_stopped(pid: int) -> None:
    """SIGKILL what is left of the process group our command `pid` leads (its DataLoader workers
    after a kill or a hang); nothing when it ended cleanly."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def last_epoch(plot: Path) -> dict[str, float]:
    """The last row of a training stage's per-epoch CSV, as numbers."""
    with open(plot, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items()}


def val_images(shards: Path, out: Path, count: int) -> list[Path]:
    """The first `count` JPEGs of the first val shard, as files (what predict reads)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    with tarfile.open(sorted(shards.glob("val-*.tar"))[0]) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(files) < count:
                path = out / Path(member.name).name
                path.write_bytes(tar.extractfile(member).read())
                files.append(path)
    return files


def cache_datasets(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every dataset of a cache file (the views read through its part files) and its attributes."""
    import h5py
    import numpy as np

    found: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return found, attrs


def cache_differences(a: Path, b: Path) -> list[str]:
    """The datasets and attributes in which two caches differ (bit for bit; NaN equal to NaN)."""
    import numpy as np

    data_a, attrs_a = cache_datasets(a)
    data_b, attrs_b = cache_datasets(b)
    different = [f"attribute {k}" for k in sorted(set(attrs_a) | set(attrs_b)) if attrs_a.get(k) != attrs_b.get(k)]
    different += [f"dataset {k} (in one only)" for k in sorted(set(data_a) ^ set(data_b))]
    for name in sorted(set(data_a) & set(data_b)):
        x, y = data_a[name], data_b[name]
        same = x.shape == y.shape and (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f"
                                       else np.array_equal(x, y))
        if not same:
            different.append(f"dataset {name}")
    return different


def weight_differences(a: Path, b: Path) -> str:
    """How two student checkpoints' tensors differ, in words; "" when they are equal bit for bit."""
    import torch

    first = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    second = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    if first.keys() != second.keys():
        return f"other tensors: {sorted(set(first) ^ set(second))[:4]}"
    differing = {name: (x.double() - second[name].double()).abs().max().item()
                 for name, x in first.items() if not torch.equal(x, second[name])}
    if not differing:
        return ""
    largest = max(differing, key=lambda name: differing[name])
    return (f"{len(differing)} of {len(first)} tensors differ, the most {largest} (max |difference| "
            f"{differing[largest]:.3g})")


class FixedBatchStudent:
    """distill's student, optimiser, objective and `train_step` on one batch already on the device:
    the student's pure compute, without data loading or view rendering."""

    def __init__(self, config: Any, anchors: Any, device: Any, warmup: int) -> None:
        import torch

        from pipeline.student import build_student, student_on
        from pipeline.training import make_optimizer
        from stages.distill import csm_objective

        torch.manual_seed(0)
        self.objective = csm_objective(config, anchors.shape[1])
        self.model = student_on(build_student(self.objective.model_spec), device).train()
        self.optimizer = make_optimizer(self.model, config.train)
        size, batch = config.train.image_size, config.train.batch_size
        generator = torch.Generator().manual_seed(0)
        self.batch = {  # as the loader ships it: uint8 views, float16 cosines to the anchors
            "pixels": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
            "targets": (torch.rand(batch, anchors.shape[0], generator=generator) * 2 - 1).half(),
        }
        self.batch = {k: v.to(device) for k, v in self.batch.items()}
        self.anchors, self.device, self.images = anchors.to(device), device, batch
        self.warmup = warmup  # untimed steps before each timed loop (after a precision switch cuDNN autotunes)

    def run(self, requested: str, steps: int, item_every_step: bool = False) -> tuple[int, float]:
        """(images, seconds) of `steps` steps under precision `requested`, after the untimed warm-up;
        the loss is read on the host after every step, or once at the end."""
        from pipeline import precision
        from pipeline.training import train_step
        from stages.bench import synchronize

        chosen = precision.for_device(requested, self.device)
        precision.configure(chosen, training=True)
        scaler = precision.grad_scaler(chosen, self.device)

        def step():
            return train_step(self.model, self.optimizer, self.objective, self.batch, self.anchors, self.device,
                              chosen, scaler)

        for _ in range(self.warmup):
            step()
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            terms = step()
            if item_every_step:
                terms["loss"].item()
        terms["loss"].item()
        synchronize(self.device)
        return steps * self.images, time.perf_counter() - started


def student_rates(student: FixedBatchStudent, steps: int) -> dict[str, float]:
    """Images/s of the student's fixed-batch loop: reading the loss at the end only ("compute"), after
    every step, and (on CUDA; on a CPU tf32 runs as fp32) in precision fp32 and tf32."""
    loops = {"compute": lambda: student.run(PRECISION, steps),
             "item_every_step": lambda: student.run(PRECISION, steps, item_every_step=True)}
    if student.device.type == "cuda":
        loops.update(fp32=lambda: student.run("fp32", steps), tf32=lambda: student.run("tf32", steps))
    return interleaved(loops)


def interleaved(measurements: dict[str, Callable[[], tuple[float, float]]], rounds: int = 2) -> dict[str, float]:
    """Rate (amount / seconds) of each measurement over `rounds` interleaved rounds (a b c a b c):
    a machine that drifts in speed affects them alike."""
    totals = {name: [0.0, 0.0] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            amount, seconds = measure()
            totals[name][0] += amount
            totals[name][1] += seconds
    return {name: amount / seconds for name, (amount, seconds) in totals.items()}


def copy_rates(batch: int, device: Any, copies: int) -> dict[str, float]:
    """GB/s of host->device copies of one batch of uint8 224 px views, from pinned and from pageable memory."""
    import torch

    from stages.bench import synchronize

    pageable = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    pinned = pageable.pin_memory()

    def copy(source: torch.Tensor) -> Callable[[], tuple[float, float]]:
        def measure() -> tuple[float, float]:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(copies):
                source.to(device, non_blocking=True)
            synchronize(device)
            return copies * source.numel() / 1e9, time.perf_counter() - started
        return measure

    copy(pinned)()  # warm-up: the first copy sets up the device's staging buffers
    return interleaved({"pinned": copy(pinned), "pageable": copy(pageable)})


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {os.cpu_count()} cores)"


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Failure(f"--device {device}: CUDA is not available to torch {torch.__version__} (built for CUDA "
                      f"{torch.version.cuda}); on a machine without a GPU run the CPU form: --cpu")


def run(smoke: Smoke) -> None:
    """Every step, in the order a user meets them; the first failure stops the run."""
    with smoke.step("device", f"{smoke.device} present") as record:
        check_device(smoke.device)
        record["result"] = f"ok: {device_description(smoke.device)}"
    smoke.make_shards()
    smoke.make_teacher()
    smoke.precompute()
    smoke.distill()
    smoke.decode_on_device()
    smoke.probe()
    smoke.predict()
    smoke.export()
    smoke.bench()
    smoke.measure_ratios()
    smoke.precompute_resume()
    smoke.distill_resume()
    smoke.distill_two_ranks()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU form: tiny settings on the CPU (what CI runs)")
    parser.add_argument("--device", help="the device every stage runs on (default: cuda; cpu with --cpu)")
    parser.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    parser.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one, removed "
                        "after a pass, kept after a failure)")
    args = parser.parse_args(argv)
    form = CPU if args.cpu else GPU
    device = args.device or form.device
    work = args.work or Path(tempfile.mkdtemp(prefix=f"csm-smoke-{form.name}-"))
    os.environ["HF_HUB_OFFLINE"] = "1"  # this process builds the random teacher: no hub either
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights loaded": that is the point
    smoke = Smoke(form, device, work)
    print(f"{form.name} smoke test on {device}, work directory {work}", flush=True)
    failed = ""
    try:
        run(smoke)
    except Exception as error:  # a Failure is a check that failed; anything else a bug here or a changed output
        failed = next((name for name, step in smoke.steps.items() if step["result"] == "FAILED"), "setup")
        log = error.log if isinstance(error, Failure) else None
        what = str(error) if isinstance(error, Failure) else f"{type(error).__name__}: {error}"
        print(f"FAIL {failed}: {what}" + (f" (log: {log})" if log else ""), flush=True)
        if log:
            print(f"--- the end of {log}:\n{tail(log)}\n---", flush=True)
        elif not isinstance(error, Failure):
            traceback.print_exc()
    summary = smoke.summary(passed=not failed, failed=failed)
    print_summary(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if failed:
        print(f"work directory kept: {work}")
        return 1
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
