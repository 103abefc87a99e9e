"""`python -m pipeline verify CACHE`: check a teacher cache's structure and every shard's checksums.

Structure: the file opens, its header is this format's, every dataset of the layout is there
with consistent lengths, every part file it maps exists. Then, per shard, its part file
belongs to the cache (same shard list) and every view block of every dataset, and its
per-image rows, have the sha256 recorded when the cache was written. Prints one line per bad
shard and a summary; bad shards make it exit with code 2, naming the part files to delete
before re-running precompute (which then recomputes those shards only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from pipeline.cache import TeacherCache, part_path
from pipeline.errors import PipelineError
from pipeline.progress import Progress


def check_structure(cache: TeacherCache) -> None:
    """Lengths that must agree; a one-line PipelineError if they do not."""
    f = cache.file
    N, V, S = cache.num_images, cache.header.views_per_image, len(cache.shard_names)
    expected = {"images/key": N, "images/shard": N, "images/position": N, "images/label": N,
                "views/image": N * V, "shards/image_start": S, "shards/image_count": S, "checksums/images": S}
    for name in f["views"]:
        expected[f"views/{name}"] = N * V
    wrong = [f"{name} has {f[name].shape[0]} rows, not {rows}" for name, rows in expected.items()
             if f[name].shape[0] != rows]
    if wrong:
        raise PipelineError(f"{cache.path}: damaged ({'; '.join(wrong[:2])}); re-run precompute")


def bad_shards(cache: TeacherCache) -> dict[int, str]:
    """Shard index -> what is wrong with it, for every shard that fails a check."""
    bad: dict[int, str] = {}
    progress = Progress(len(cache.shard_names), "verify", "shard")
    for shard in range(len(cache.shard_names)):
        try:
            if cache.image_count[shard]:
                with h5py.File(part_path(cache.path, shard), "r") as part:
                    if part.attrs["shard_digest"] != cache.header.shard_digest:
                        raise PipelineError(f"{part_path(cache.path, shard)} was written for another shard list")
            cache.shard_targets(shard, None, with_embeddings=cache.header.store_embeddings)
        except (PipelineError, OSError, KeyError) as err:
            bad[shard] = str(err).replace(f"{cache.path}: ", "")
        progress.update()
    progress.close()
    return bad


def run(path: str | Path) -> dict[str, Any]:
    cache = TeacherCache(path)  # the header, the datasets and the part files are there
    check_structure(cache)
    cache.anchors()  # checked against its checksum
    bad = bad_shards(cache)
    for shard, problem in bad.items():
        print(f"bad shard {shard} ({cache.shard_names[shard]}): {problem}")
    shards = len(cache.shard_names)
    if bad:
        parts = " ".join(str(part_path(cache.path, s)) for s in list(bad)[:3])
        raise PipelineError(
            f"{cache.path}: {len(bad)} of {shards} shards bad ({', '.join(cache.shard_names[s] for s in list(bad)[:5])}"
            f"{' ...' if len(bad) > 5 else ''}); delete their part files ({parts}{' ...' if len(bad) > 3 else ''}) "
            f"and re-run precompute with the same settings: it recomputes those shards only"
        )
    print(f"{cache.path}: ok: {shards} shards, {cache.num_images} images x {cache.header.views_per_image} views, "
          f"every checksum matches")
    return {"shards": shards, "bad": bad}
