"""The confusion summary (pipeline.confusion) on hand-counted examples, and the hard world's twins."""

from __future__ import annotations

import pytest
import torch

from pipeline import confusion, demo_world


def test_a_hand_counted_confusion_summary():
    # 4 classes; true 0 -> predicted 1 twice, true 2 -> 3 once and -> 0 once; 6 right
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    predicted = torch.tensor([0, 1, 1, 0, 1, 1, 3, 0, 2, 3])
    matrix = confusion.confusion_matrix(predicted, labels, 4)
    assert matrix.tolist() == [[2, 2, 0, 0], [0, 2, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1]]
    related = {0: [1], 1: [0], 2: [3], 3: [2]}
    summary = confusion.summarize(matrix, ["a", "b", "c", "d"], related, top=2)
    assert summary["errors"] == 4 and summary["error_rate"] == 0.4
    assert summary["top_pair_share"] == 3 / 4  # 0->1 (2) and one of c's two single errors
    assert summary["related_share"] == 3 / 4  # 0->1 twice, 2->3 once; 2->0 is unrelated
    assert summary["related_chance"] == pytest.approx(1 / 3)  # each class has 1 related of 3 others
    assert summary["pairs"][0] == {"true": "a", "predicted": "b", "count": 2, "share_of_true": 0.5, "related": True}
    assert len(summary["pairs"]) == 2 and summary["pairs"][1]["count"] == 1
    line = confusion.describe("teacher", summary, pairs=1)
    assert line == ("teacher: 40.0% wrong; 75% of the errors on a related class (chance 33%); 75% on each class's "
                    "top confuser; most confused: a -> b (50%)")


def test_no_errors_and_no_relations():
    matrix = confusion.confusion_matrix(torch.arange(3), torch.arange(3), 3)
    summary = confusion.summarize(matrix, ["a", "b", "c"])
    assert summary == {"predictions": 3, "errors": 0, "error_rate": 0.0, "top_pair_share": 0.0, "pairs": []}


def test_the_hard_worlds_twins_are_one_attribute_apart():
    classes = demo_world.demo_classes(demo_world.HARD)
    twins = demo_world.twin_classes(demo_world.HARD)
    assert len(classes) == 64 and len({c.id for c in classes}) == 64
    by_index = {c.index: c for c in classes}
    for c in classes:
        for other in (by_index[i] for i in twins[c.index]):
            assert (other.colour == c.colour) != (other.shape == c.shape)  # exactly one attribute differs
            assert c.index in twins[other.index]  # symmetric
    # every colour has a twin, 6 of 8 shapes do: 8 x 6 classes with two twins, 8 x 2 with one
    assert sorted(len(t) for t in twins.values()) == [1] * 16 + [2] * 48
    assert not any(demo_world.twin_classes(demo_world.EASY).values())
