"""`python -m pipeline ssl`: a vision-only self-supervised baseline (SimCLR or BYOL) for the probe table.

The student's architecture, resolution, optimiser, schedule, batch of images and epochs (the
train section, as distill and the supervised reference), trained on two of the cache's views
of each image with lightly's losses and heads (pipeline/ssl.py); its backbone is probed like the
student's (`probe --baselines simclr=data/models/simclr.pt`). Needs a cache with at least two
views per image; the teacher's targets are never read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import ssl
from pipeline.cache import TeacherCache
from pipeline.config import SslConfig
from pipeline.errors import PipelineError
from pipeline.shards import list_shards
from pipeline.training import Objective, train, write_outputs

log = logging.getLogger(__name__)


def objective_of(config: SslConfig) -> Objective:
    spec = {"arch": config.train.arch, "out_dim": config.projection_dim, "head": config.method,
            "head_hidden": config.projection_hidden, "normalize_output": False}
    if config.method == "simclr":
        loss, score = ssl.simclr_loss(config.temperature), "pair_top1"
    else:
        loss, score = ssl.byol_loss(), "cosine"

    def after_step(model, step: int, total_steps: int) -> None:
        model.after_step(step, total_steps, config.target_momentum)

    return Objective(config.method, spec, loss, needs_targets=False, score_name=score,
                     needs_pairs=True, build=ssl.SelfSupervised, after_step=after_step)


def run(config: SslConfig) -> dict[str, Any]:
    shards = list_shards(config.train.shards, "train")
    cache = TeacherCache(config.train.cache)
    cache.require(shards=shards)
    if cache.header.views_per_image < 2:
        raise PipelineError(f"{config.train.cache}: holds {cache.header.views_per_image} view per image; "
                            f"an SSL baseline needs two (re-run precompute with --views 2 or more)")
    objective = objective_of(config)
    settings = {"method": config.method, "projection_dim": config.projection_dim,
                "projection_hidden": config.projection_hidden, "temperature": config.temperature,
                "target_momentum": config.target_momentum}
    model, history = train(config.train, objective, cache, shards, Path(config.run_dir), {"ssl": settings})
    student = ssl.student_of(model)
    final = history[-1]
    first = history[0]
    metrics = {
        "method": config.method,
        "epochs": len(history),
        "final_loss": final["loss"],
        "first_epoch_loss": first["loss"],
        # how far from converged: the last epoch's loss against the one before (1.0: flat)
        "last_epoch_loss_ratio": final["loss"] / history[-2]["loss"] if len(history) > 1 else None,
        objective.score_name: final[objective.score_name],
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
    }
    write_outputs(config, objective, student, history, metrics, {"ssl": settings})
    log.info("wrote %s: %s loss %.4f (first epoch %.4f), %s %.3f", config.out, config.method,
             metrics["final_loss"], metrics["first_epoch_loss"], objective.score_name, final[objective.score_name])
    return metrics
