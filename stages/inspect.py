"""`python -m pipeline inspect FILE`: a teacher cache's identity, counts, anchors and targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import TeacherCache

SAMPLE_VIEWS = 20_000  # the distribution summary reads at most this many views, evenly spaced


def summary(path: str | Path, tau_teacher: float) -> dict[str, Any]:
    """Identity, counts and target statistics of a cache (also used by tests)."""
    reader = TeacherCache(path)
    header = reader.header
    views = reader.num_images * header.views_per_image
    rows = np.unique(np.linspace(0, max(0, views - 1), num=min(views, SAMPLE_VIEWS)).astype(np.int64))
    similarities = torch.from_numpy(reader.similarities(rows)) if views else torch.empty(0, 1)
    p = torch.softmax(similarities / tau_teacher, dim=-1)
    entropy = -(torch.special.xlogy(p, p)).sum(-1)
    labels = reader.labels()
    anchor_classes = reader.anchor_classes()
    image_of_row = reader.view_images(rows) if views else np.empty(0, np.int64)
    argmax_class = anchor_classes[similarities.argmax(-1)].numpy() if views else np.empty(0)
    labelled = labels[image_of_row] >= 0
    result = {
        "file": str(path),
        "bytes": reader.stored_bytes(),
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
        "teacher_label_agreement": float((argmax_class[labelled] == labels[image_of_row][labelled]).mean())
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
