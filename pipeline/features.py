"""Frozen features of a shard split and zero-shot classification against anchors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeline.progress import Progress
from pipeline.shards import Sample, ShardBatches, iterate_batches, sample_count
from pipeline.views import eval_view


def centre_view_batches(shards: Sequence[Path], sizes: dict[str, int], batch_size: int) -> ShardBatches:
    """Shards in file order; each sample gives its evaluation view (`eval_view`: shorter side
    resized, centre crop, as CLIP evaluates) at every named resolution."""

    def prepare(sample: Sample, _: object) -> dict[str, torch.Tensor]:
        return {name: eval_view(sample.image, size) for name, size in sizes.items()}

    return ShardBatches(shards, batch_size, prepare)


@torch.no_grad()
def extract_features(
    shards: Sequence[Path],
    encoders: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]],
    batch_size: int,
    workers: int,
    desc: str = "features",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Run every encoder (name -> (resolution, fn on [0,1] pixels)) over the shards' evaluation views.

    Images are decoded once and resized once per distinct resolution. Returns the features
    per encoder (N, D) float32 on CPU, the labels (N,) and the keys of corrupt samples.
    """
    sizes = {f"pixels_{size}": size for size, _ in encoders.values()}
    loader = iterate_batches(centre_view_batches(shards, sizes, batch_size), workers)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    labels, corrupt = [], []
    progress = Progress(sample_count(shards), desc, "img")
    for batch in loader:
        corrupt.extend(batch["corrupt"])
        if not batch["keys"]:
            continue
        for name, (size, encode) in encoders.items():
            features[name].append(encode(batch[f"pixels_{size}"]).float().cpu())
        labels.append(batch["labels"])
        progress.update(len(batch["keys"]))
    progress.close()
    stacked = {name: torch.cat(chunks) for name, chunks in features.items()}
    return stacked, torch.cat(labels), corrupt


def zero_shot_scores(
    embeddings: torch.Tensor, anchors: torch.Tensor, anchor_classes: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class scores (N, C): the best cosine similarity over each class's anchors."""
    similarity = torch.nn.functional.normalize(embeddings.float(), dim=-1) @ anchors.float().T
    scores = torch.full((embeddings.shape[0], num_classes), float("-inf"))
    index = anchor_classes.long()[None, :].expand_as(similarity)
    return scores.scatter_reduce(1, index, similarity, reduce="amax")


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())
