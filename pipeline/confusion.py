"""Which classes a model mistakes for which: the confusion summary of a classifier's errors.

A real CLIP is unsure in a structured way: its errors on ImageNet fall on related classes (one
dog breed for another), rarely on unrelated ones. `summarize` says how structured a model's
errors are: the most-confused (true, predicted) pairs, how concentrated the errors are (the share
that falls on each true class's most frequent wrong class), and, where the dataset says which
classes are related (the hard demo world's twins, `pipeline.demo_world.twin_classes`), the share
of errors on a related class beside the share that uniform errors would put there (its chance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import demo_world
from pipeline.errors import PipelineError
from pipeline.shards import ClassInfo, demo_world_of


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row the true class, column the predicted one."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize(matrix: torch.Tensor, names: list[str], related: dict[int, list[int]] | None = None,
              top: int = 10) -> dict[str, Any]:
    """The errors of `matrix` (`confusion_matrix`) in a few figures and the `top` confused pairs.

    - `error_rate`: wrong predictions / predictions;
    - `top_pair_share`: the share of errors that fall on their true class's most frequent wrong
      class (1/(classes-1) or so when errors are spread evenly, 1 when each class has one confuser);
    - `related_share` and `related_chance` (with `related`): the share of errors whose prediction
      is related to the true class, and the share it would be if each error went to a uniformly
      drawn other class;
    - `pairs`: the `top` most frequent (true, predicted) errors, each with its count and its share
      of the true class's images.
    """
    matrix = matrix.long()
    num_classes = matrix.shape[0]
    totals = matrix.sum(dim=1)
    wrong = matrix.clone()
    wrong.fill_diagonal_(0)
    errors = int(wrong.sum())
    summary: dict[str, Any] = {
        "predictions": int(totals.sum()),
        "errors": errors,
        "error_rate": errors / max(1, int(totals.sum())),
        "top_pair_share": int(wrong.max(dim=1).values.sum()) / errors if errors else 0.0,
    }
    if related is not None:
        on_related = sum(int(wrong[t, related.get(t, [])].sum()) for t in range(num_classes))
        chance = sum(int(wrong[t].sum()) * len(related.get(t, [])) / (num_classes - 1) for t in range(num_classes))
        summary["related_share"] = on_related / errors if errors else 0.0
        summary["related_chance"] = chance / errors if errors else 0.0
    counts, order = wrong.flatten().sort(descending=True)
    pairs = []
    for count, flat in zip(counts.tolist()[:top], order.tolist()[:top], strict=True):
        if count == 0:
            break
        true, predicted = divmod(flat, num_classes)
        pairs.append({"true": names[true], "predicted": names[predicted], "count": count,
                      "share_of_true": round(count / int(totals[true]), 4),
                      **({"related": predicted in related.get(true, [])} if related is not None else {})})
    summary["pairs"] = pairs
    return summary


def describe(name: str, summary: dict[str, Any], pairs: int = 3) -> str:
    """One line: `name`'s error rate, how structured its errors are, its most confused pairs."""
    parts = [f"{name}: {100 * summary['error_rate']:.1f}% wrong"]
    if "related_share" in summary:
        parts.append(f"{100 * summary['related_share']:.0f}% of the errors on a related class "
                     f"(chance {100 * summary['related_chance']:.0f}%)")
    parts.append(f"{100 * summary['top_pair_share']:.0f}% on each class's top confuser")
    worst = ", ".join(f"{p['true']} -> {p['predicted']} ({100 * p['share_of_true']:.0f}%)"
                      for p in summary["pairs"][:pairs])
    return "; ".join(parts) + (f"; most confused: {worst}" if worst else "")


def display_names(classes: list[ClassInfo]) -> list[str]:
    """Class names for people: the name, with the id where two classes share it (homonyms)."""
    counts: dict[str, int] = {}
    for c in classes:
        counts[c.name] = counts.get(c.name, 0) + 1
    return [c.name if counts[c.name] == 1 else f"{c.name} ({c.id})" for c in classes]


def related_classes(shards: str | Path) -> dict[int, list[int]] | None:
    """Which classes are related, where the shards say: the twins of the hard demo world."""
    try:
        world = demo_world_of(Path(shards))
    except PipelineError:
        return None  # not demo shards
    twins = demo_world.twin_classes(demo_world.WORLDS[world])
    return twins if any(twins.values()) else None
