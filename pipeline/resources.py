"""Files the project ships under `data/`: ImageNet class metadata, prompt templates, teachers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
IMAGENET_CLASSES = DATA_DIR / "imagenet" / "classes.json"


@functools.lru_cache(maxsize=1)
def imagenet_by_wnid() -> dict[str, dict]:
    """ImageNet-1K metadata (index, wnid, name, hypernyms, gloss, context) keyed by wnid."""
    if not IMAGENET_CLASSES.is_file():
        return {}
    return {row["wnid"]: row for row in json.loads(IMAGENET_CLASSES.read_text())}
