"""`python -m pipeline demo-teacher`: pre-train a small CLIP on the demo world's captions.

The project's CLIP pre-training stage. The model is built from a JSON model config: open_clip's
CLIP (`arch: two-tower`, a small ViT image tower) or MS-CLIP (`arch: ms-clip`, one transformer
shared by the image and text towers, `pipeline.msclip`). It is trained on a stream of freshly
rendered demo images and their captions (seeded apart from the shards, so the val shards stay
unseen; `caption_noise` swaps a seeded share of them for other images' captions) with
`objective: clip` (the contrastive loss, identical captions all positives) or `objective: psd`
(progressive self-distillation, a reconstruction: `pipeline.losses.psd_loss`, alpha ramping up
from 0). It is saved as fp16 safetensors beside its config and loaded by every stage through the
same path as a real CLIP checkpoint. The default demo teacher is trained once and shipped;
training resumes from its last checkpoint if interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from pipeline import confusion, demo_world, faults, preemption
from pipeline.atomic import atomic_path, write_json
from pipeline.config import DemoTeacherConfig, TeacherConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.features import extract_features, top1, zero_shot_scores
from pipeline.losses import psd_loss
from pipeline.progress import Progress
from pipeline.prompts import class_anchors
from pipeline.shards import demo_world_of, list_shards, read_classes, usable_workers
from pipeline.student import save_checkpoint
from pipeline.teacher import Teacher, TeacherSpec, build_model, resolve_teacher
from pipeline.training import decay_groups, learning_rate
from pipeline.views import apply_view, normalize_pixels, sample_view_params

log = logging.getLogger(__name__)

class CaptionStream(Dataset):
    """Item i: a demo image (random resized crop) and its tokenised caption.

    With `images` 0 every item is a freshly rendered image (an endless stream: no pair is seen
    twice); with `images` N the stream cycles through a fixed set of N images and their captions,
    a finite dataset seen for several epochs (item i is image i mod N, with a new crop every
    epoch and the same caption, noisy or not, every epoch, as a web dataset's wrong caption is).
    """

    def __init__(self, seed: int, length: int, side: int, tokenizer: Any,
                 crop_scale: tuple[float, float], crop_ratio: tuple[float, float], caption_noise: float = 0.0,
                 images: int = 0, world: demo_world.World = demo_world.EASY) -> None:
        self.seed, self.length, self.side, self.tokenizer = seed, length, side, tokenizer
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.caption_noise, self.images = caption_noise, images
        self.world = world

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_index = index % self.images if self.images else index
        pixels, attributes = demo_world.make_image(self.seed, "train", image_index, self.side, self.world)
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        rng = np.random.default_rng([self.seed, 7, index])
        params = sample_view_params(rng, 1, self.side, self.side, self.crop_scale, self.crop_ratio, False)
        view = apply_view(image, params[0], self.side)
        caption = demo_world.noisy_caption(self.seed, "train", image_index, self.images or self.length,
                                           self.caption_noise, attributes.caption, self.world)
        return view, self.tokenizer([caption])[0], caption_id(caption)


def caption_id(caption: str) -> int:
    """An id of the caption's text: identical captions in a batch are all positives of each other."""
    return int(hashlib.sha1(caption.encode()).hexdigest()[:15], 16)


@torch.no_grad()
def zero_shot_accuracy(teacher: Teacher, config: DemoTeacherConfig) -> dict[str, Any]:
    """Zero-shot top-1 on the val shards with plain and with CPA class anchors.

    Also per class, for the classes that have CPA contexts (the demo world's homonyms):
    `per_class[id] = {"name", "context", "plain", "cpa"}`; and the confusion summary of the CPA
    classifier (`confusion`: `pipeline.confusion.summarize`, twins as related in the hard world).
    """
    shards = list_shards(config.shards, "val")
    classes = read_classes(config.shards)
    features, labels, _ = extract_features(
        shards, {"teacher": (teacher.image_size, teacher.encode_image)}, 256, 0, "zero-shot"
    )
    results: dict[str, Any] = {"per_class": {
        c.id: {"name": c.name, "context": ", ".join(c.contexts)} for c in classes if c.contexts}}
    for prompt_set in ("plain", "cpa"):
        anchors = class_anchors(teacher.encode_text, classes, config.prompts, prompt_set)
        scores = zero_shot_scores(features["teacher"], anchors, torch.arange(len(classes)),
                                  len(classes))
        results[prompt_set] = top1(scores, labels)
        correct = scores.argmax(-1) == labels
        if prompt_set == "cpa":  # which classes it mistakes for which (pipeline/confusion.py)
            results["confusion"] = confusion.summarize(
                confusion.confusion_matrix(scores.argmax(-1), labels, len(classes)),
                confusion.display_names(classes), confusion.related_classes(config.shards))
        for c in classes:
            if c.id in results["per_class"] and (labels == c.index).any():
                results["per_class"][c.id][prompt_set] = round(float(correct[labels == c.index].float().mean()), 4)
    return results


def check_arch(config: DemoTeacherConfig, spec: TeacherSpec) -> None:
    """`arch` must name the architecture of the config file (`spec`, resolved from it)."""
    if spec.arch_kind != config.arch:
        raise PipelineError(f"option --arch {config.arch}: {config.config} is a {spec.arch_kind} model config; "
                            f"pass the config of a {config.arch} model, or --arch {spec.arch_kind}")


def psd_alpha(config: DemoTeacherConfig, step: int) -> float:
    """PSD's alpha at `step`: 0 for objective clip; else a linear ramp from 0 reaching psd_alpha_max
    after psd_ramp of the training steps."""
    if config.objective == "clip":
        return 0.0
    ramp_steps = max(1.0, config.psd_ramp * config.steps)
    return config.psd_alpha_max * min(1.0, step / ramp_steps)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """fp16 safetensors, written under a temporary name and renamed."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def run(config: DemoTeacherConfig) -> dict[str, Any]:
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    if out.suffix != ".safetensors":
        raise PipelineError(f"option --out {out}: the demo teacher is saved as .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    list_shards(config.shards, "val")  # fail early, before training, if the shards are missing
    torch.manual_seed(config.seed)
    architecture = TeacherConfig(model="", pretrained="", checkpoint="", config=config.config)
    if config.init:
        architecture = replace(architecture, checkpoint=config.init)
    spec = resolve_teacher(architecture)
    check_arch(config, spec)
    model, tokenizer = build_model(architecture, allow_random=not config.init, spec=spec)
    side = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple)
               else model.visual.image_size)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    # CLIP's AdamW settings; no weight decay on gains, biases, embeddings or the logit scale
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay, ("embedding", "token")),
                                  lr=config.lr, betas=(0.9, 0.98), eps=1e-6)

    resume_path = out.with_name(out.name + ".resume.pt")
    step, elapsed, history = 0, 0.0, []
    if resume_path.is_file():
        state = torch.load(resume_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], json.loads(state["history"])
        log.info("resuming demo-teacher training at step %d", step)

    world = demo_world.WORLDS[demo_world_of(config.shards)]  # the world of the val shards it is measured on
    stream = CaptionStream(config.seed, config.steps * config.batch_size, side, tokenizer, config.crop_scale,
                           config.crop_ratio, config.caption_noise, config.train_images, world)
    sampler = range(step * config.batch_size, config.steps * config.batch_size)
    loader = DataLoader(stream, batch_size=config.batch_size, sampler=sampler,
                        num_workers=usable_workers(config.workers), drop_last=True,
                        worker_init_fn=preemption.ignore_in_worker)
    model.train()
    progress = Progress(config.steps, "demo-teacher", "step", initial=step)
    started = time.perf_counter() - elapsed

    def resume_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": time.perf_counter() - started, "history": json.dumps(history)}

    with preemption.StopSignals() as signals:  # a stop signal: a checkpoint after the step in progress
        for images, tokens, caption_ids in loader:
            faults.signal_at("step", step + 1)  # test hook: a signal while this step runs
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.steps, config.warmup_steps, config.lr)
            image_embeddings = F.normalize(model.encode_image(normalize_pixels(images, mean, std)), dim=-1)
            text_embeddings = F.normalize(model.encode_text(tokens), dim=-1)
            alpha = psd_alpha(config, step)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # the same rows on resume
            terms = psd_loss(image_embeddings, text_embeddings, model.logit_scale, alpha, config.psd_rho,
                             generator, caption_ids)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            progress.update()
            progress.set_postfix(loss=f"{terms['loss'].item():.3f}",
                                 scale=f"{model.logit_scale.exp().item():.1f}")
            evaluate_now = config.eval_every and step % config.eval_every == 0 and step < config.steps
            if step % 100 == 0 or step == config.steps or evaluate_now:  # an evaluation gets its own step's entry
                history.append({"step": step, "loss": round(terms["loss"].item(), 4), "alpha": round(alpha, 4)})
            if evaluate_now or step % 250 == 0:
                save_weights(model, out)
                if evaluate_now:
                    accuracy = zero_shot_accuracy(evaluation_teacher(config), config)
                    history[-1].update(plain=accuracy["plain"], cpa=accuracy["cpa"])
                    log.info("step %d: zero-shot plain %.3f, cpa %.3f", step, accuracy["plain"],
                             accuracy["cpa"])
                    model.train()
                save_checkpoint(resume_path, resume_state())
            if signals.received and step < config.steps:
                save_checkpoint(resume_path, resume_state())
                progress.close()
                log.warning("stopped by %s at step %d of %d (checkpoint %s); run the same command to resume",
                            preemption.name(signals.received), step, config.steps, resume_path)
                raise preemption.Stopped(signals.received)
    progress.close()
    seconds = time.perf_counter() - started
    save_weights(model, out)
    teacher = evaluation_teacher(config)
    accuracy = zero_shot_accuracy(teacher, config)
    metrics = {
        "zero_shot_top1_plain": accuracy["plain"],
        "zero_shot_top1_cpa": accuracy["cpa"],
        "zero_shot_per_class_with_context": accuracy["per_class"],
        "zero_shot_confusion_cpa": accuracy["confusion"],
        "arch": config.arch,
        "objective": config.objective,
        "caption_noise": config.caption_noise,
        "train_images": config.train_images,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "train_seconds": round(seconds, 1),
        "weights_bytes": out.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "identity": teacher.identity,
        "history": history,
    }
    write_json(out.with_suffix(".metrics.json"), metrics)
    write_resolved(config, out.with_suffix(".config.json"))
    resume_path.unlink(missing_ok=True)
    print(f"demo teacher {out} ({out.stat().st_size / 1e6:.1f} MB, {seconds / 60:.1f} min): "
          f"zero-shot top-1 plain {accuracy['plain']:.3f}, cpa {accuracy['cpa']:.3f}")
    return metrics


def evaluation_teacher(config: DemoTeacherConfig) -> Teacher:
    """The saved weights loaded back through the regular teacher path (c)."""
    from pipeline.teacher import load_teacher

    return load_teacher(TeacherConfig(model="", pretrained="", checkpoint=config.out,
                                      config=config.config), device="cpu")


