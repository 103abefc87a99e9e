"""`python -m pipeline shards`: webdataset shards from an image folder or the demo world.

The folder source reads `<root>/<class>/<image>`; its val split is a share of it, a second
folder of the same layout, or a flat folder of images labelled by a file (ImageNet's val split
as distributed: `ILSVRC2012_val_*.JPEG` with `LOC_val_solution.csv` or the devkit's
`ILSVRC2012_validation_ground_truth.txt` + `meta.mat`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import demo_world
from pipeline.config import ShardsConfig, write_resolved
from pipeline.errors import PipelineError, reason
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
# `--max-side`: images larger than that are resized once (Lanczos) and re-encoded at this quality,
# FFCV's default for its pre-sized ImageNet.
PRESIZED_QUALITY = 90
# ImageNet's val labels: Kaggle's CSV header, and the devkit file that maps class ids to wnids.
LOC_HEADER = "ImageId,PredictionString"
DEVKIT_META = "meta.mat"
FLAT_VAL_HINT = ("for ImageNet's flat val folder pass --val-labels LOC_val_solution.csv or "
                 "ILSVRC2012_validation_ground_truth.txt")


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


def demo_record(job: tuple[int, str, int, int, float, int, str]) -> ShardRecord:
    seed, split, index, side, caption_noise, count, world = job
    sample = demo_world.make_sample(seed, split, index, side, caption_noise, count, demo_world.WORLDS[world])
    attributes = sample.attributes.record()
    return ShardRecord(sample.key, sample.jpeg, sample.attributes.label,
                       sample.attributes.caption, attributes)


def write_demo(config: ShardsConfig, out: Path) -> dict[str, Any]:
    if config.train < 1 or config.val < 1:
        raise PipelineError("options --train and --val must be at least 1 for the demo source")
    if config.image_size < 16:
        raise PipelineError("option --image-size must be at least 16 for the demo source")
    out.mkdir(parents=True, exist_ok=True)
    remove_old_shards(out)
    world = demo_world.WORLDS[config.world]
    write_classes(out, [ClassInfo(c.index, c.id, c.name, demo_world.demo_contexts(c))
                        for c in demo_world.demo_classes(world)])
    splits = {}
    for split, count in (("train", config.train), ("val", config.val), ("shifted", config.shifted)):
        if count == 0:  # the shifted split is optional
            continue
        jobs = [(config.seed, split, i, config.image_size, config.caption_noise, count, world.name)
                for i in range(count)]
        records = parallel_map(demo_record, jobs, config.workers, f"demo {split}")
        splits[split] = write_split(out, split, records, config.max_per_shard)
    return {"source": "demo", "world": world.name, "seed": config.seed, "image_size": config.image_size,
            "classes": len(demo_world.demo_classes(world)), "splits": splits, "skipped": []}


# --------------------------------------------------------------------------- folder source


def sample_key(relative: Path) -> str:
    """A stable key from a relative path: dots (which webdataset reads as extensions) -> '_'."""
    return relative.as_posix().replace(".", "_")


def class_folders(root: Path, option: str, flat_hint: str = "") -> list[str]:
    """The class folder names of root, sorted; `flat_hint` is added to the error when root holds
    image files but no folders."""
    if not root.is_dir():
        raise PipelineError(f"{root}: image folder not found (option {option})")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        flat = flat_hint and any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
        raise PipelineError(
            f"{root}: no class folders; expected the layout <root>/<class>/<image> (option {option})"
            + (f"; {flat_hint}" if flat else "")
        )
    return folders


def image_files(directory: Path, root: Path, skipped: list[dict]) -> list[Path]:
    """Paths relative to root of the image files under directory, recursively, sorted; other files
    are recorded in `skipped`."""
    files = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        relative = path.relative_to(root)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(relative)
        else:
            skipped.append({"path": str(root / relative), "reason": "not an image extension"})
    return files


def list_images(root: Path, classes: dict[str, int], skipped: list[dict]) -> list[tuple[Path, int]]:
    """(relative path, label) for every image file under root/<class>/, recursively."""
    files = []
    for folder, label in classes.items():
        directory = root / folder
        if directory.is_dir():
            files.extend((relative, label) for relative in image_files(directory, root, skipped))
    return files


def shuffled_by_key(files: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """A deterministic, input-order-independent mix of classes (shards must not be class-sorted)."""
    return sorted(files, key=lambda item: hashlib.sha256(sample_key(item[0]).encode()).hexdigest())


def in_val(relative: Path, fraction: float) -> bool:
    value = int(hashlib.sha256(relative.as_posix().encode()).hexdigest()[:8], 16) / 2**32
    return value < fraction


def presized(image: Image.Image, max_side: int) -> bytes | None:
    """`image` resized so its longer side is `max_side` (Lanczos) as JPEG bytes at
    PRESIZED_QUALITY; None when it is no larger (it is stored as it is)."""
    if not max_side or max(image.size) <= max_side:
        return None
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    buffer = io.BytesIO()
    to_rgb(image).resize(size, Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=PRESIZED_QUALITY)
    return buffer.getvalue()


def folder_record(job: tuple[str, str, int, int]) -> ShardRecord | dict[str, str]:
    """The shard record of one file (pre-sized to a longer side of job's max_side when it is
    larger), or a skip entry {path, reason} if it is not a readable image."""
    path, key, label, max_side = job
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            smaller = presized(image, max_side)
            if smaller is not None:
                return ShardRecord(key, smaller, label)
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
    if config.val_labels and not config.val_root:
        raise PipelineError("option --val-labels needs --val-root, the flat folder of the val images it labels")
    root = Path(config.root)
    folders = class_folders(root, "--root")
    labels = {folder: index for index, folder in enumerate(folders)}
    skipped: list[dict] = []
    train_files = list_images(root, labels, skipped)
    if config.val_labels:
        val_root = Path(config.val_root)
        val_files = flat_val_images(val_root, Path(config.val_labels), root, labels, skipped)
        sources = {"train": (root, train_files), "val": (val_root, val_files)}
    elif config.val_root:
        val_root = Path(config.val_root)
        unknown = sorted(set(class_folders(val_root, "--val-root", FLAT_VAL_HINT)) - set(labels))
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
        jobs = [(str(base / rel), sample_key(rel), label, config.max_side) for rel, label in shuffled_by_key(files)]
        results = parallel_map(folder_record, jobs, config.workers, f"folder {split}")
        splits[split] = write_split(out, split, keep_records(results, skipped), config.max_per_shard)
    if skipped:
        log.warning("skipped %d file(s); see %s", len(skipped), out / MANIFEST_FILE)
    return {"source": "folder", "root": str(root), "val_root": config.val_root,
            "val_labels": config.val_labels, "val_fraction": config.val_fraction, "classes": len(folders),
            "max_side": config.max_side, "splits": splits, "skipped": skipped}


def keep_records(results: Iterable, skipped: list[dict]) -> Iterator[ShardRecord]:
    for result in results:
        if isinstance(result, ShardRecord):
            yield result
        else:
            skipped.append(result)


# --------------------------------------------------------------------------- ImageNet's flat val folder

def loc_val_labels(text: str, source: str) -> dict[str, str]:
    """Image id -> wnid from Kaggle's LOC_val_solution.csv: rows `ImageId,PredictionString`, the
    prediction string being boxes `wnid x_min y_min x_max y_max ...` whose first token is the class."""
    labels: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (number == 1 and line.replace(" ", "") == LOC_HEADER):
            continue
        image_id, comma, boxes = line.partition(",")
        tokens = boxes.split()
        if not comma or not image_id.strip() or not tokens:
            raise PipelineError(f"{source} line {number}: expected '{LOC_HEADER}' with the wnid first in "
                                f"PredictionString, got {line[:80]!r}")
        image_id = image_id.strip()
        if labels.setdefault(image_id, tokens[0]) != tokens[0]:
            raise PipelineError(f"{source} line {number}: image {image_id} is labelled both "
                                f"{labels[image_id]} and {tokens[0]}")
    return labels


def devkit_val_labels(text: str, wnids: dict[int, str], source: str) -> dict[str, str]:
    """Image id -> wnid from the devkit's ILSVRC2012_validation_ground_truth.txt: line i holds the
    ILSVRC2012_ID of ILSVRC2012_val_{i:08d}.JPEG; `wnids` maps those ids to wnids (`leaf_wnids`)."""
    labels = {}
    for number, line in enumerate(text.rstrip().splitlines(), 1):
        try:
            class_id = int(line)
        except ValueError:
            raise PipelineError(f"{source} line {number}: expected one ILSVRC2012_ID (1-1000) per line, "
                                f"got {line[:80]!r}") from None
        if class_id not in wnids:
            raise PipelineError(f"{source} line {number}: class id {class_id} is not one of the "
                                f"{len(wnids)} leaf classes of the {DEVKIT_META} beside it")
        labels[f"ILSVRC2012_val_{number:08d}"] = wnids[class_id]
    return labels


def leaf_wnids(synsets: Any) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the leaf synsets (num_children == 0: the 1000 classes) of the devkit
    meta.mat's `synsets` struct array, as `scipy.io.loadmat(..., squeeze_me=True)` returns it."""
    return {int(synset["ILSVRC2012_ID"]): str(synset["WNID"])
            for synset in np.atleast_1d(synsets) if int(synset["num_children"]) == 0}


def read_meta_mat(path: Path) -> dict[int, str]:
    import scipy.io  # only the devkit's labels need it

    if not path.is_file():
        raise PipelineError(f"{path}: not found; ILSVRC2012_validation_ground_truth.txt needs the devkit's "
                            f"{DEVKIT_META} beside it (ILSVRC2012_devkit_t12/data/) to map class ids to wnids")
    try:
        return leaf_wnids(scipy.io.loadmat(str(path), squeeze_me=True)["synsets"])
    except Exception as err:  # any failure to read the file or find the struct's fields is a bad file
        raise PipelineError(f"{path}: not the ImageNet devkit's {DEVKIT_META} (a 'synsets' struct with "
                            f"ILSVRC2012_ID, WNID, num_children): {reason(err)}") from None


def read_val_labels(path: Path) -> tuple[str, dict[str, str]]:
    """(format name, image id -> wnid) of an ImageNet val labels file, its format told by its content."""
    if not path.is_file():
        raise PipelineError(f"{path}: labels file not found (option --val-labels)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: not a text labels file (option --val-labels): {err}") from None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.replace(" ", "") == LOC_HEADER or re.match(r"[^,\s]+,", first):
        return "LOC_val_solution.csv", loc_val_labels(text, str(path))
    if first.isdigit():
        wnids = read_meta_mat(path.parent / DEVKIT_META)
        return "devkit ground truth + meta.mat", devkit_val_labels(text, wnids, str(path))
    raise PipelineError(f"{path}: not an ImageNet val labels file (option --val-labels); expected "
                        f"LOC_val_solution.csv ({LOC_HEADER} rows) or the devkit's "
                        "ILSVRC2012_validation_ground_truth.txt (one class id per line)")


def flat_val_images(val_root: Path, labels_path: Path, root: Path, classes: dict[str, int],
                    skipped: list[dict]) -> list[tuple[Path, int]]:
    """(relative path, label) of every image of a flat val folder, labelled by an ImageNet labels file
    whose image ids are the file names without extension; `classes` are the train class folders."""
    if not val_root.is_dir():
        raise PipelineError(f"{val_root}: image folder not found (option --val-root)")
    label_format, wnid_of = read_val_labels(labels_path)
    images = image_files(val_root, val_root, skipped)
    if not images:
        raise PipelineError(f"{val_root}: no image files; with --val-labels, --val-root is a flat folder of "
                            "images such as ImageNet's val (ILSVRC2012_val_00000001.JPEG ...)")
    unlabelled = [relative for relative in images if relative.stem not in wnid_of]
    if unlabelled:
        more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
        raise PipelineError(f"{val_root / unlabelled[0]}{more}: no label in {labels_path} (option --val-labels)")
    files = []
    for relative in images:
        wnid = wnid_of[relative.stem]
        if wnid not in classes:
            raise PipelineError(f"{labels_path}: image {relative.stem} has class {wnid}, which is not a class "
                                f"folder of --root {root}")
        files.append((relative, classes[wnid]))
    absent = len(wnid_of.keys() - {relative.stem for relative in images})
    if absent:
        log.warning("%s labels %d image(s) that are not in %s; a partial val folder, they are left out",
                    labels_path, absent, val_root)
    log.info("val labels of %d image(s) from %s (%s)", len(files), labels_path, label_format)
    return files
