"""`python -m pipeline supervised`: the supervised reference (the ceiling of the probe table).

The same student architecture, resolution, views (replayed from the cache), optimiser and
schedule as distill, trained with cross-entropy on the labels instead of the teacher's
targets; its backbone is probed like the student's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.cache import TeacherCache
from pipeline.config import SupervisedConfig
from pipeline.losses import supervised_loss
from pipeline.shards import list_shards, read_classes
from pipeline.training import Objective, train, write_outputs

log = logging.getLogger(__name__)


def run(config: SupervisedConfig) -> dict[str, Any]:
    shards = list_shards(config.train.shards, "train")
    cache = TeacherCache(config.train.cache)
    cache.require(shards=shards, labels=True)
    num_classes = len(read_classes(config.train.shards))

    def loss(logits, batch: dict[str, Any]):
        return supervised_loss(logits, batch["labels"])

    spec = {"arch": config.train.arch, "out_dim": num_classes, "head": "linear",
            "head_hidden": config.train.head_hidden, "normalize_output": False}
    objective = Objective("supervised", spec, loss, needs_targets=False, score_name="accuracy")
    model, history = train(config.train, objective, cache, shards, Path(config.run_dir), {})
    final = history[-1]
    metrics = {
        "epochs": len(history),
        "final_loss": final["loss"],
        "train_accuracy": final["accuracy"],
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
    }
    write_outputs(config, objective, model, history, metrics, {})
    log.info("wrote %s: loss %.4f, train accuracy %.3f", config.out, metrics["final_loss"],
             metrics["train_accuracy"])
    return metrics
