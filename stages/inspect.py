"""`python -m pipeline inspect FILE`: a teacher cache's identity, counts, anchors and targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import TeacherCache

SAMPLE_VIEWS = 20_000  # the distribution summary reads at most this many views


def sample_views(reader: TeacherCache) -> tuple[torch.Tensor, np.ndarray]:
    """Similarities and labels of up to SAMPLE_VIEWS views: one view block per shard (view
    index shard mod V), shards spread over the whole cache, each block checked against its
    checksum as stage two reads it."""
    V = reader.header.views_per_image
    shards = [s for s in range(len(reader.shard_names)) if reader.image_count[s]]
    per_shard = max(1.0, float(np.mean([reader.image_count[s] for s in shards]))) if shards else 1.0
    take = max(1, min(len(shards), int(SAMPLE_VIEWS // per_shard)))
    chosen = [shards[int(i)] for i in np.unique(np.linspace(0, len(shards) - 1, take).astype(int))] if shards else []
    blocks = [reader.shard_targets(s, s % V) for s in chosen]
    if not blocks:
        return torch.empty(0, reader.header.num_anchors), np.empty(0, np.int32)
    similarities = torch.from_numpy(np.concatenate([b.similarities for b in blocks]))
    return similarities, np.concatenate([b.labels for b in blocks])


def summary(path: str | Path, tau_teacher: float) -> dict[str, Any]:
    """Identity, counts and target statistics of a cache (also used by tests)."""
    reader = TeacherCache(path)
    header = reader.header
    views = reader.num_images * header.views_per_image
    similarities, labels = sample_views(reader)
    p = torch.softmax(similarities / tau_teacher, dim=-1)
    entropy = -(torch.special.xlogy(p, p)).sum(-1)
    anchor_classes = reader.anchor_classes()
    argmax_class = anchor_classes[similarities.argmax(-1)].numpy() if len(labels) else np.empty(0)
    labelled = labels >= 0
    result = {
        "file": str(path),
        "bytes": reader.stored_bytes(),
        "sampled_views": int(len(labels)),
        "header": header.to_attrs(),
        "shards": len(reader.shard_names),
        "images": reader.num_images,
        "views": views,
        "prompts": len(reader.prompts()),
        "anchors": int(reader.anchors().shape[0]),
        "tau_teacher": tau_teacher,
        "mean_max_probability": float(p.max(-1).values.mean()) if views else math.nan,
        "mean_entropy": float(entropy.mean()) if views else math.nan,
        "max_entropy": math.log(header.num_anchors),
        "teacher_label_agreement": float((argmax_class[labelled] == labels[labelled]).mean())
        if labelled.any() else math.nan,
        "example_prompts": reader.prompts()[:3],
    }
    reader.close()
    return result


def run(path: str | Path, tau_teacher: float) -> dict[str, Any]:
    info = summary(path, tau_teacher)
    header = info["header"]
    print(f"cache        {info['file']} ({info['bytes'] / 1e6:.1f} MB, format v{header['format_version']}, "
          f"csm-distill {header['package_version']})")
    print(f"teacher      {header['teacher_identity']}")
    print(f"             {header['teacher_image_size']}px, embedding {header['embed_dim']}, "
          f"mean {header['teacher_mean']}, std {header['teacher_std']}")
    print(f"prompts      {info['prompts']} ({header['prompt_set']}), digest {header['prompt_digest'][:16]}")
    print(f"anchors      {info['anchors']} ({header['anchor_mode']} mode, {header['num_classes']} classes)")
    print(f"images       {info['images']} in {info['shards']} shards, shard digest {header['shard_digest'][:16]}")
    print(f"views        {info['views']} ({header['views_per_image']} per image; crop scale "
          f"{header['crop_scale']}, ratio {[round(r, 3) for r in header['crop_ratio']]}, flip {header['flip']}, "
          f"seed {header['view_seed']})")
    print(f"storage      {'top-' + str(header['topk']) if header['topk'] else 'all anchors'}, "
          f"{info['bytes'] / max(1, info['views']):.0f} bytes/view, embeddings "
          f"{'stored' if header['store_embeddings'] else 'not stored'}")
    print(f"targets      at tau {tau_teacher}: mean max-probability {info['mean_max_probability']:.3f}, "
          f"mean entropy {info['mean_entropy']:.3f} nats (uniform: {info['max_entropy']:.3f})")
    print(f"             teacher argmax = label on {info['teacher_label_agreement']:.3f} of labelled views")
    print(f"e.g.         {info['example_prompts']}")
    return info
