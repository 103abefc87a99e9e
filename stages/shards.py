"""`python -m pipeline shards`: webdataset shards from an image folder or the demo world."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import demo_world
from pipeline.config import ShardsConfig, write_resolved
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.resources import imagenet_by_wnid
from pipeline.shards import (
    MANIFEST_FILE,
    ClassInfo,
    ShardRecord,
    ShardWriterState,
    atomic_write_text,
    remove_old_shards,
    to_rgb,
    write_classes,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
REENCODE_QUALITY = 95


def run(config: ShardsConfig) -> dict[str, Any]:
    out = Path(config.out)
    if config.max_per_shard < 1:
        raise PipelineError("option --max-per-shard must be at least 1")
    started = time.perf_counter()
    if config.source == "demo":
        manifest = write_demo(config, out)
    else:
        manifest = write_folder(config, out)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    write_resolved(config, out / "shards.config.json")
    counts = ", ".join(f"{split} {manifest['splits'][split]['samples']}" for split in manifest["splits"])
    log.info("wrote %s: %s samples, %d skipped, in %.1f s", out, counts,
             len(manifest["skipped"]), manifest["seconds"])
    return manifest


def write_split(
    out: Path, split: str, records: Iterable[ShardRecord], max_per_shard: int
) -> dict[str, Any]:
    writer = ShardWriterState(out, split, max_per_shard)
    per_class: Counter[int] = Counter()
    for record in records:
        writer.write(record)
        per_class[record.label] += 1
    shards = writer.close()
    return {
        "samples": sum(per_class.values()),
        "per_class": {str(k): per_class[k] for k in sorted(per_class)},
        "shards": shards,
    }


def parallel_map(function: Callable, items: Sequence, workers: int, desc: str) -> Iterator:
    """function(item) for each item, in order, over `workers` processes."""
    progress = Progress(len(items), desc, "img")
    if workers <= 1:
        for item in items:
            yield function(item)
            progress.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for result in pool.imap(function, items, chunksize=64):
                yield result
                progress.update()
    progress.close()


# --------------------------------------------------------------------------- demo source


def demo_record(job: tuple[int, str, int, int, float, int]) -> ShardRecord:
    seed, split, index, side, caption_noise, count = job
    sample = demo_world.make_sample(seed, split, index, side, caption_noise, count)
    attributes = asdict(sample.attributes)
    return ShardRecord(sample.key, sample.jpeg, sample.attributes.label,
                       sample.attributes.caption, attributes)


def write_demo(config: ShardsConfig, out: Path) -> dict[str, Any]:
    if config.train < 1 or config.val < 1:
        raise PipelineError("options --train and --val must be at least 1 for the demo source")
    if config.image_size < 16:
        raise PipelineError("option --image-size must be at least 16 for the demo source")
    out.mkdir(parents=True, exist_ok=True)
    remove_old_shards(out)
    write_classes(out, [ClassInfo(c.index, c.id, c.name, demo_world.demo_contexts(c))
                        for c in demo_world.demo_classes()])
    splits = {}
    for split, count in (("train", config.train), ("val", config.val)):
        jobs = [(config.seed, split, i, config.image_size, config.caption_noise, count) for i in range(count)]
        records = parallel_map(demo_record, jobs, config.workers, f"demo {split}")
        splits[split] = write_split(out, split, records, config.max_per_shard)
    return {"source": "demo", "seed": config.seed, "image_size": config.image_size,
            "classes": len(demo_world.demo_classes()), "splits": splits, "skipped": []}


# --------------------------------------------------------------------------- folder source


def sample_key(relative: Path) -> str:
    """A stable key from a relative path: dots (which webdataset reads as extensions) -> '_'."""
    return relative.as_posix().replace(".", "_")


def class_folders(root: Path, option: str) -> list[str]:
    if not root.is_dir():
        raise PipelineError(f"{root}: image folder not found (option {option})")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise PipelineError(
            f"{root}: no class folders; expected the layout <root>/<class>/<image> (option {option})"
        )
    return folders


def list_images(root: Path, classes: dict[str, int], skipped: list[dict]) -> list[tuple[Path, int]]:
    """(relative path, label) for every image file under root/<class>/, recursively."""
    files = []
    for folder, label in classes.items():
        directory = root / folder
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            relative = path.relative_to(root)
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((relative, label))
            else:
                skipped.append({"path": str(root / relative), "reason": "not an image extension"})
    return files


def shuffled_by_key(files: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """A deterministic, input-order-independent mix of classes (shards must not be class-sorted)."""
    return sorted(files, key=lambda item: hashlib.sha256(sample_key(item[0]).encode()).hexdigest())


def in_val(relative: Path, fraction: float) -> bool:
    value = int(hashlib.sha256(relative.as_posix().encode()).hexdigest()[:8], 16) / 2**32
    return value < fraction


def folder_record(job: tuple[str, str, int]) -> ShardRecord | dict[str, str]:
    """The shard record of one file, or a skip entry {path, reason} if it is not a readable image."""
    path, key, label = job
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return ShardRecord(key, data, label)  # kept byte for byte (CMYK JPEGs are re-encoded as RGB)
            buffer = io.BytesIO()
            to_rgb(image).save(buffer, format="JPEG", quality=REENCODE_QUALITY)
            return ShardRecord(key, buffer.getvalue(), label)
    except Exception as err:  # any failure to read or decode makes it a skipped file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return {"path": path, "reason": f"unreadable image: {reason}"}


def folder_class_info(folders: Sequence[str]) -> list[ClassInfo]:
    """Classes in folder order; WordNet-id folders get ImageNet names and CPA contexts."""
    imagenet = imagenet_by_wnid()
    classes = []
    for index, folder in enumerate(folders):
        meta = imagenet.get(folder)
        if meta is not None:
            classes.append(ClassInfo(index, folder, meta["name"], (meta["context"],)))
        else:
            classes.append(ClassInfo(index, folder, folder.replace("_", " ")))
    return classes


def write_folder(config: ShardsConfig, out: Path) -> dict[str, Any]:
    if not config.root:
        raise PipelineError("option --root is required for --source folder")
    root = Path(config.root)
    folders = class_folders(root, "--root")
    labels = {folder: index for index, folder in enumerate(folders)}
    skipped: list[dict] = []
    train_files = list_images(root, labels, skipped)
    if config.val_root:
        val_root = Path(config.val_root)
        unknown = sorted(set(class_folders(val_root, "--val-root")) - set(labels))
        if unknown:
            raise PipelineError(
                f"{val_root}: class folder(s) {', '.join(unknown[:5])} are not in --root {root}"
            )
        val_files = list_images(val_root, labels, skipped)
        sources = {"train": (root, train_files), "val": (val_root, val_files)}
    else:
        if not 0.0 <= config.val_fraction < 1.0:
            raise PipelineError("option --val-fraction must be in [0, 1)")
        sources = {
            "train": (root, [f for f in train_files if not in_val(f[0], config.val_fraction)]),
            "val": (root, [f for f in train_files if in_val(f[0], config.val_fraction)]),
        }
    if not train_files:
        raise PipelineError(f"{root}: no image files found under its class folders")

    out.mkdir(parents=True, exist_ok=True)
    remove_old_shards(out)
    write_classes(out, folder_class_info(folders))
    splits = {}
    for split, (base, files) in sources.items():
        jobs = [(str(base / rel), sample_key(rel), label) for rel, label in shuffled_by_key(files)]
        results = parallel_map(folder_record, jobs, config.workers, f"folder {split}")
        splits[split] = write_split(out, split, keep_records(results, skipped), config.max_per_shard)
    if skipped:
        log.warning("skipped %d file(s); see %s", len(skipped), out / MANIFEST_FILE)
    return {"source": "folder", "root": str(root), "val_root": config.val_root,
            "val_fraction": config.val_fraction, "classes": len(folders),
            "splits": splits, "skipped": skipped}


def keep_records(results: Iterable, skipped: list[dict]) -> Iterator[ShardRecord]:
    for result in results:
        if isinstance(result, ShardRecord):
            yield result
        else:
            skipped.append(result)
