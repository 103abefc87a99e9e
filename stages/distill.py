"""`python -m pipeline distill`: stage two, the student trained with CSM against the cache.

The loss is KL(p_T || p_S) over the cached anchors (`pipeline.losses.csm_loss`). The cache
must come from the teacher and prompt set the params name: a different format version,
teacher identity or anchor digest is refused before any training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.cache import TeacherCache
from pipeline.config import DistillConfig
from pipeline.errors import PipelineError
from pipeline.losses import csm_loss, embedding_loss
from pipeline.prompts import build_prompt_set, prompt_set_digest
from pipeline.shards import list_shards, read_classes
from pipeline.teacher import teacher_identity
from pipeline.training import Objective, train, write_outputs

log = logging.getLogger(__name__)


def check_cache(cache: TeacherCache, config: DistillConfig, shards: list[Path], embeddings: bool = False) -> None:
    """Refuse a cache that does not hold what the params ask for, saying what differs."""
    expected_teacher = teacher_identity(config.teacher)
    prompt_set = build_prompt_set(read_classes(config.train.shards), config.prompts)
    cache.require(
        teacher_identity=expected_teacher,
        prompt_digest=prompt_set_digest(prompt_set),
        prompts=f"{config.prompts.set} prompts, {config.prompts.anchors} anchors, {len(prompt_set.prompts)} strings",
        shards=shards, embeddings=embeddings, fix="re-run precompute or fix the teacher options",
    )


def csm_objective(config: DistillConfig, embed_dim: int) -> Objective:
    """CSM, embedding distillation, or their sum (`--loss`); the score is always the agreement."""

    def loss(embeddings, batch: dict[str, Any]):
        csm = csm_loss(batch["targets"], embeddings, batch["anchors"], config.tau_teacher,
                       config.tau_student)
        if config.loss == "csm":
            return csm
        feature = embedding_loss(batch["teacher_embeddings"], embeddings)
        weight = 1.0 if config.loss == "embedding" else config.embedding_weight
        total = feature["loss"] * weight + (csm["loss"] if config.loss == "both" else 0.0)
        return {**csm, "cosine": feature["cosine"], "loss": total}

    spec = {"arch": config.train.arch, "out_dim": embed_dim, "head": config.train.head,
            "head_hidden": config.train.head_hidden, "normalize_output": True}
    return Objective("distill", spec, loss, needs_targets=True, score_name="agreement",
                     needs_embeddings=config.loss != "csm")


def run(config: DistillConfig) -> dict[str, Any]:
    if config.tau_teacher <= 0 or config.tau_student <= 0:
        raise PipelineError("options --tau-teacher and --tau-student must be positive")
    if config.embedding_weight < 0:
        raise PipelineError("option --embedding-weight must be >= 0")
    shards = list_shards(config.train.shards, "train")
    cache = TeacherCache(config.train.cache)
    objective = csm_objective(config, cache.header.embed_dim)
    check_cache(cache, config, shards, embeddings=objective.needs_embeddings)
    model, history = train(config.train, objective, cache, shards, Path(config.run_dir),
                           {"tau_teacher": config.tau_teacher, "tau_student": config.tau_student,
                            "loss": config.loss, "embedding_weight": config.embedding_weight})
    final = history[-1]
    metrics = {
        "epochs": len(history),
        "final_loss": final["loss"],
        "teacher_agreement_top1": final["agreement"],
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
    }
    write_outputs(config, objective, model, history, metrics, {
        "anchor_digest": cache.header.prompt_digest,
        "teacher_identity": cache.header.teacher_identity,
    })
    log.info("wrote %s: loss %.4f, teacher agreement %.3f, %.0f images/s", config.out,
             metrics["final_loss"], metrics["teacher_agreement_top1"], metrics["images_per_second"])
    return metrics
