"""data/imagenet/classes.json: ImageNet-1K class metadata with disambiguating CPA contexts."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

CLASSES = Path(__file__).resolve().parent.parent / "data" / "imagenet" / "classes.json"
FIELDS = ["index", "wnid", "name", "lemmas", "hypernyms", "gloss", "context"]


@cache
def classes() -> list[dict]:
    return json.loads(CLASSES.read_text(encoding="utf-8"))


def by_wnid() -> dict[str, dict]:
    return {row["wnid"]: row for row in classes()}


def test_thousand_classes_in_index_order() -> None:
    rows = classes()
    assert len(rows) == 1000
    assert [row["index"] for row in rows] == list(range(1000))
    assert all(list(row) == FIELDS for row in rows)
    assert (rows[0]["wnid"], rows[0]["name"]) == ("n01440764", "tench")


def test_wnids_unique_and_well_formed() -> None:
    wnids = [row["wnid"] for row in classes()]
    assert len(set(wnids)) == 1000
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)


def test_contexts_present_and_not_the_name() -> None:
    for row in classes():
        assert row["context"].strip(), row
        assert row["context"].lower() != row["name"].lower(), row
        assert row["name"] and row["lemmas"] and row["gloss"], row


def test_crane_contexts_differ() -> None:
    bird, machine = by_wnid()["n02012849"], by_wnid()["n03126707"]
    assert "crane" in bird["name"] and "crane" in machine["name"]
    assert bird["context"] != machine["context"]
    assert "bird" in bird["context"]


def test_maillot_contexts_differ() -> None:
    tights, swimsuit = by_wnid()["n03710637"], by_wnid()["n03710721"]
    assert "maillot" in tights["lemmas"] and "maillot" in swimsuit["lemmas"]
    assert tights["context"] != swimsuit["context"]


def test_homonym_groups_have_distinct_contexts() -> None:
    """Classes sharing a display name or a first lemma (case-insensitive) get different contexts."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in classes():
        groups["name:" + row["name"].lower()].append(row)
        groups["lemma:" + row["lemmas"][0].lower()].append(row)
    homonyms = {key: rows for key, rows in groups.items() if len(rows) > 1}
    assert {"name:missile", "name:sunglasses", "lemma:crane", "lemma:maillot"} <= set(homonyms)
    for key, rows in homonyms.items():
        contexts = [row["context"].lower() for row in rows]
        assert len(set(contexts)) == len(contexts), (key, [(r["wnid"], r["context"]) for r in rows])
