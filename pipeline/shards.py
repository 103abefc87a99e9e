"""Webdataset shards: the format every stage reads, and the one reader they all use.

A shard directory holds `train-NNNNNN.tar` and `val-NNNNNN.tar`, a `classes.json` (index ->
id, display name, CPA contexts) and a `manifest.json` (counts, shard list with sha256,
skipped inputs). Each sample has a stable `__key__` without dots, `jpg` bytes, `cls` (int
class index) and optionally `txt` (caption) and `json` (attributes).

`ShardBatches` is the reading building block: an IterableDataset that decodes samples in
DataLoader workers, never mixes shards inside a batch (so a stage can process a shard's
rows together) and reports corrupt samples instead of crashing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.atomic import commit, temporary_path
from pipeline.atomic import write_text as atomic_write_text
from pipeline.errors import PipelineError
from pipeline.preemption import ignore_in_worker
from pipeline.progress import Progress

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "shifted")  # shifted: the demo's distribution-shift split (optional)
CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.json"
# Fixed member times: the same input gives byte-identical shards. An int, not 0.0: a float
# mtime makes tarfile add a PAX header to every member, doubling the headers a reader parses
# (measured: 168 -> 84 us per sample to read a demo shard) and the shard size (10.2 -> 6.1 MB).
TAR_MTIME = 0
JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class ClassInfo:
    index: int
    id: str  # folder name (e.g. a WordNet id) or demo class id
    name: str  # display name used in prompts
    contexts: tuple[str, ...] = ()  # CPA contexts (empty: plain prompts only)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """The shards of one split in order; a one-line error if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineError(
            f"{directory}: shard directory not found; create it with `python -m pipeline shards`"
        )
    shards = sorted(directory.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if not shards:
        raise PipelineError(f"{directory}: no {split}-NNNNNN.tar shards found")
    return shards


def read_classes(directory: str | Path) -> list[ClassInfo]:
    path = Path(directory) / CLASSES_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: not found; shard directories need a classes.json")
    try:
        raw = json.loads(path.read_text())
        classes = [
            ClassInfo(int(c["index"]), str(c["id"]), str(c["name"]), tuple(c.get("contexts", ())))
            for c in raw
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"{path}: not a valid classes file ({err})") from None
    if [c.index for c in classes] != list(range(len(classes))):
        raise PipelineError(f"{path}: class indices must be 0..{len(classes) - 1} in order")
    return classes


def write_classes(directory: Path, classes: Sequence[ClassInfo]) -> None:
    rows = [
        {"index": c.index, "id": c.id, "name": c.name, "contexts": list(c.contexts)}
        for c in classes
    ]
    atomic_write_text(directory / CLASSES_FILE, json.dumps(rows, indent=1) + "\n")



def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The one reader of `manifest.json`; {} when the directory has none."""
    manifest = Path(directory) / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    try:
        content = json.loads(manifest.read_text())
        if not isinstance(content, dict):
            raise TypeError
        return content
    except (json.JSONDecodeError, TypeError):
        raise PipelineError(f"{manifest}: not a valid manifest; re-run `python -m pipeline shards`") from None


def manifest_rows(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's row (samples, bytes, sha256) of every shard in `directory`, by file name."""
    splits = read_manifest(directory).get("splits", {})
    return {row["name"]: row for split in splits.values() for row in split.get("shards", [])}


def demo_world_of(directory: Path) -> str:
    """The demo world demo shards were rendered in (`shards --world`): "easy" for shards written
    before the option existed. Raises for shards that are not the demo's."""
    manifest = read_manifest(directory)
    if manifest.get("source") != "demo":
        raise PipelineError(f"{directory}: not demo shards (manifest.json says source "
                            f"{manifest.get('source')!r}); make them with `python -m pipeline shards --source demo`")
    return str(manifest.get("world", "easy"))


def sample_count(shards: Sequence[Path]) -> int | None:
    """Samples in `shards` per their manifests (for progress totals); None when one is not listed."""
    rows: dict[Path, dict[str, dict[str, Any]]] = {}
    total = 0
    for shard in shards:
        listed = rows.setdefault(shard.parent, manifest_rows(shard.parent)).get(shard.name)
        if listed is None:
            return None
        total += int(listed["samples"])
    return total


def shard_list_digest(shards: Sequence[Path]) -> str:
    """Digest of shard names, sizes and sha256: changes whenever any shard's content does.

    The sha256 of each shard comes from the manifest beside it when the manifest lists it
    with the same size (hashing a full ImageNet once more would cost minutes); otherwise the
    file is hashed.
    """
    known: dict[str, tuple[int, str]] = {}
    for directory in {shard.parent for shard in shards}:
        for name, row in manifest_rows(directory).items():
            known[str(directory / name)] = (row["bytes"], row["sha256"])
    sizes = {shard: shard.stat().st_size for shard in shards}
    unlisted = [s for s in shards if known.get(str(s), (None,))[0] != sizes[s]]
    progress = Progress(sum(sizes[s] for s in unlisted) // 2**20, "hashing shards", "MiB") if unlisted else None
    digest = hashlib.sha256()
    for shard in shards:
        if shard in unlisted:
            sha = sha256_file(shard)
            progress.update(sizes[shard] // 2**20)
        else:
            sha = known[str(shard)][1]
        digest.update(f"{shard.name}\0{sizes[shard]}\0{sha}\n".encode())
    if progress is not None:
        progress.close()
    return digest.hexdigest()


@dataclass
class ShardRecord:
    """One sample to write: key, JPEG bytes, label and optional caption and attributes."""

    key: str
    jpeg: bytes
    label: int
    caption: str | None = None
    attributes: dict[str, Any] | None = None


@dataclass
class ShardWriterState:
    directory: Path
    split: str
    max_per_shard: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _writer: wds.TarWriter | None = None
    _file: Any = None
    _count: int = 0

    def write(self, record: ShardRecord) -> None:
        if "." in record.key or record.key.startswith("/") or "\\" in record.key:
            raise ValueError(f"shard keys must be relative, without dots or backslashes: {record.key}")
        if self._writer is None or self._count >= self.max_per_shard:
            self._close()
            self._open()
        sample: dict[str, Any] = {"__key__": record.key, "jpg": record.jpeg, "cls": record.label}
        if record.caption is not None:
            sample["txt"] = record.caption
        if record.attributes is not None:
            sample["json"] = record.attributes
        self._writer.write(sample)
        self._count += 1

    def _open(self) -> None:
        path = temporary_path(self.directory / shard_name(self.split, len(self.shards)))
        self._file = open(path, "wb")
        self._writer = wds.TarWriter(self._file, mtime=TAR_MTIME, user="csm", group="csm")
        self._count = 0
        self.shards.append({"name": shard_name(self.split, len(self.shards))})

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        final = self.directory / self.shards[-1]["name"]
        commit(temporary_path(final), final)
        self.shards[-1].update(samples=self._count, bytes=final.stat().st_size,
                               sha256=sha256_file(final))
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def remove_old_shards(directory: Path) -> None:
    """A re-run replaces a directory's shards; stale higher-numbered shards must not remain."""
    for split in SPLITS:
        for old in directory.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()


# --------------------------------------------------------------------------- reading


@dataclass
class Sample:
    key: str
    shard: int  # index of the shard in the list being read
    position: int  # index of the sample inside its shard
    image: torch.Tensor | None  # (3, H, W) uint8, None when the image could not be decoded (or was not)
    label: int
    caption: str | None
    jpeg: bytes | None = None  # the encoded image, when the sample is left for the device to decode


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode image bytes (any mode: grey, CMYK, palette) to a (3, H, W) uint8 RGB tensor.

    JPEGs go through torchvision's libjpeg-turbo decoder (3x faster than PIL on small
    images, same pixels); anything else, or a JPEG it rejects, through PIL.
    """
    if data[:2] == JPEG_MAGIC:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decodes it or raises the error that marks the sample corrupt
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(to_rgb(image))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16- and 32-bit greyscale scaled (not clipped) to 8 bits,
    transparency (RGBA, LA, palette with a transparent colour) composited over white, CMYK and
    palette converted. Pillow refuses decompression bombs (DecompressionBombError) on open."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def iter_raw(path: Path) -> Iterator[dict[str, Any]]:
    """The undecoded samples of one shard in file order (dicts of bytes by extension).

    A damaged shard gives the samples before the damage: a zero-byte or truncated file, or a
    member cut short, ends the shard there with a warning (every pass reads the same samples,
    so stage one and stage two agree). A file that is not a tar at all is an error.
    """
    if path.is_file() and path.stat().st_size == 0:
        log.warning("%s: empty (zero bytes): no samples; re-create it", path)
        return
    count = 0
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            count += 1
            yield sample
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        if count == 0 and not isinstance(err, EOFError) and "truncated" not in str(err).lower():
            raise PipelineError(f"{path}: unreadable shard ({err}); re-create it") from None
        log.warning("%s: damaged after %d samples (%s): the rest of the shard is skipped; re-create it",
                    path, count, str(err).splitlines()[0] if str(err) else type(err).__name__)


def decode_sample(raw: dict[str, Any], shard: int, position: int, decode: bool = True) -> Sample:
    """A Sample from raw bytes; an undecodable image gives image=None (reported, not raised).
    With `decode` False the image is left encoded (`jpeg`) for the training device to decode."""
    key = raw["__key__"]
    image = None
    if decode and "jpg" in raw:
        try:
            image = decode_rgb(raw["jpg"])
        except Exception as err:  # any decoder failure is a corrupt sample, not a crash
            log.debug("corrupt image %s in shard %d: %s", key, shard, err)
    try:
        label = int(raw["cls"].decode()) if "cls" in raw else -1
    except ValueError:
        label = -1
    caption = raw["txt"].decode() if "txt" in raw else None
    return Sample(key, shard, position, image, label, caption, None if decode else raw.get("jpg"))


def iter_shard(path: Path, shard: int, decode: bool = True) -> Iterator[Sample]:
    """The decoded samples of one shard in file order (encoded, with `decode` False)."""
    for position, raw in enumerate(iter_raw(path)):
        yield decode_sample(raw, shard, position, decode)


class ShardBatches(IterableDataset):
    """Batches of prepared samples from a shard list, one shard at a time.

    prepare(sample, context) -> dict of tensors, run in the worker for each decodable sample;
    shard_context(shard_index) -> context, called once per shard in the worker (e.g. to read
    that shard's HDF5 rows in one slice). Each yielded batch is a dict with "shard", "keys",
    "positions", the stacked prepared tensors, "corrupt" (keys of undecodable samples) and
    "last" (True on a shard's final batch). With `order_seed` set, shards and samples within
    a shard are permuted by (order_seed, epoch); otherwise file order. Shards are dealt to
    workers round-robin, so the batch sequence is deterministic for a given worker count.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        batch_size: int,
        prepare: Callable[[Sample, Any], dict[str, torch.Tensor]],
        shard_context: Callable[[int], Any] | None = None,
        order_seed: int | None = None,
        epoch: int = 0,
        shard_indices: Sequence[int] | None = None,
        decode: bool = True,
    ) -> None:
        self.shards = list(shards)
        self.batch_size = batch_size
        self.decode = decode  # False: samples reach `prepare` encoded (`--decode device`)
        self.prepare = prepare
        self.shard_context = shard_context
        self.order_seed = order_seed
        self.epoch = epoch
        self.shard_indices = list(shard_indices) if shard_indices is not None else None

    def shard_order(self) -> list[int]:
        order = self.shard_indices if self.shard_indices is not None else list(
            range(len(self.shards)))
        if self.order_seed is not None:
            rng = np.random.default_rng([self.order_seed, self.epoch])
            order = [order[i] for i in rng.permutation(len(order))]
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for shard in self.shard_order()[worker::workers]:
                yield from self.shard_batches(shard)
        except PipelineError as err:
            # Raised in the main process by `iterate_batches`: a worker's traceback would
            # otherwise replace the one-line message.
            yield {"error": str(err)}

    def shard_batches(self, shard: int) -> Iterator[dict[str, Any]]:
        context = self.shard_context(shard) if self.shard_context is not None else None
        samples: Iterator[Sample] = iter_shard(self.shards[shard], shard, self.decode)
        if self.order_seed is not None:
            # Permute the encoded bytes (small), decode in the new order.
            raw = list(iter_raw(self.shards[shard]))
            rng = np.random.default_rng([self.order_seed, self.epoch, shard])
            samples = (decode_sample(raw[i], shard, int(i), self.decode) for i in rng.permutation(len(raw)))
        pending: list[tuple[Sample, dict[str, torch.Tensor]]] = []
        corrupt: list[str] = []
        full: dict[str, Any] | None = None  # held back until we know whether it is the last
        for sample in samples:
            if sample.image is None and sample.jpeg is None:
                corrupt.append(sample.key)
                continue
            pending.append((sample, self.prepare(sample, context)))
            if len(pending) == self.batch_size:
                if full is not None:
                    yield full
                full = collate(shard, pending, corrupt, last=False)
                pending, corrupt = [], []
        if full is not None and not pending:
            full["last"] = True
            full["corrupt"].extend(corrupt)
            yield full
            return
        if full is not None:
            yield full
        # A shard yields max(1, ceil(decodable / batch_size)) batches; the final one has last=True.
        yield collate(shard, pending, corrupt, last=True)


class SharedPosition:
    """(epoch, lap) of a training run, in shared memory: the main process moves it, and
    persistent DataLoader workers, which keep their copy of the dataset across epochs, read
    it when the next iteration starts."""

    def __init__(self, epoch: int = 0, lap: int = 0) -> None:
        self.values = torch.tensor([epoch, lap], dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.values[0])

    @property
    def lap(self) -> int:
        return int(self.values[1])

    def move_to(self, epoch: int, lap: int) -> None:
        self.values[0], self.values[1] = epoch, lap


class MixedBatches(IterableDataset):
    """Training batches that mix the images of several shards, for one rank of a run.

    Each epoch (and each further lap, when a rank needs more batches than its shards give),
    the shards are permuted by (seed, epoch, lap) and dealt to ranks (`order[rank::world]`),
    then to DataLoader workers round-robin. A worker reads `mix` of its shards at a time
    (their encoded bytes: the memory it holds), shuffles their samples together, decodes and
    prepares them, and yields full batches; what is left of a group carries over to the
    next, so a worker yields at most one smaller batch, at its end. The sequence is a
    function of (seed, epoch, lap, rank, world, workers, mix, batch size).

    prepare(sample, context) and shard_context(shard) are as for `ShardBatches`; every
    batch has "shards" (per sample), "keys", "positions", "labels", "corrupt" and the
    stacked prepared tensors. `epoch` is an int, or a `SharedPosition` (then `lap` is its),
    for a loader whose workers persist across epochs and laps.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        batch_size: int,
        prepare: Callable[[Sample, Any], dict[str, torch.Tensor]],
        shard_context: Callable[[int], Any] | None,
        seed: int,
        epoch: int | SharedPosition,
        rank: int = 0,
        world: int = 1,
        mix: int = 4,
        lap: int = 0,
        decode: bool = True,
    ) -> None:
        self.shards = list(shards)
        self.batch_size, self.prepare, self.shard_context = batch_size, prepare, shard_context
        self.decode = decode  # False: samples reach `prepare` encoded (`--decode device`)
        self.seed = seed
        self.position = epoch if isinstance(epoch, SharedPosition) else SharedPosition(epoch, lap)
        self.rank, self.world, self.mix = rank, world, max(1, mix)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def lap(self) -> int:
        return self.position.lap

    def rank_shards(self) -> list[int]:
        """This rank's shards this epoch and lap, in the order it reads them."""
        order = np.random.default_rng([self.seed, self.epoch, self.lap]).permutation(len(self.shards))
        return [int(s) for s in order[self.rank::self.world]]

    def shard_order(self) -> list[int]:  # what `iterate_batches` sizes the worker count by
        return self.rank_shards()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, lap = self.epoch, self.lap  # read once: the main process moves them between iterations
        mine = self.rank_shards()[worker::workers]
        pending: list[tuple[Sample, dict[str, torch.Tensor]]] = []
        corrupt: list[str] = []
        try:
            for first in range(0, len(mine), self.mix):
                group = mine[first:first + self.mix]
                contexts = {s: self.shard_context(s) for s in group} if self.shard_context else {}
                raw = [(s, position, r) for s in group for position, r in enumerate(iter_raw(self.shards[s]))]
                rng = np.random.default_rng([self.seed, epoch, lap, self.rank, worker, first])
                for i in rng.permutation(len(raw)):
                    shard, position, record = raw[i]
                    sample = decode_sample(record, shard, position, self.decode)
                    if sample.image is None and sample.jpeg is None:
                        corrupt.append(sample.key)
                        continue
                    pending.append((sample, self.prepare(sample, contexts.get(shard))))
                    if len(pending) == self.batch_size:
                        yield collate_mixed(pending, corrupt)
                        pending, corrupt = [], []
        except PipelineError as err:
            yield {"error": str(err)}
            return
        if pending or corrupt:
            yield collate_mixed(pending, corrupt)


def collate_mixed(pending: list, corrupt: list[str]) -> dict[str, Any]:
    batch = collate(-1, pending, corrupt, last=False)
    batch["shards"] = torch.tensor([s.shard for s, _ in pending], dtype=torch.long)
    return batch


def collate(shard: int, pending: list, corrupt: list[str], last: bool) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "shard": shard,
        "keys": [s.key for s, _ in pending],
        "positions": torch.tensor([s.position for s, _ in pending], dtype=torch.long),
        "labels": torch.tensor([s.label for s, _ in pending], dtype=torch.long),
        "captions": [s.caption for s, _ in pending],
        "corrupt": corrupt,
        "last": last,
    }
    if pending:
        for name in pending[0][1]:
            values = [prepared[name] for _, prepared in pending]
            # encoded images differ in length: they travel as a list (`--decode device`)
            batch[name] = values if name.endswith("_bytes") else torch.stack(values)
    return batch


_CAPPED: set[int] = set()


def usable_workers(requested: int) -> int:
    """DataLoader workers, capped at the CPU cores this process may run on.

    More workers than cores only compete for them (and torch warns about it at every loader);
    the cap is said once per process, in one line.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if requested <= cores:
        return requested
    if requested not in _CAPPED:
        _CAPPED.add(requested)
        log.info("workers %d: this process may use %d CPU core(s); running %d DataLoader workers",
                 requested, cores, cores)
    return cores


def check_shared_memory(what: str, options: str, workers: int, prefetch: int, batch_bytes: int,
                        local_processes: int = 1, shm: Path = Path("/dev/shm")) -> int:
    """Log the shared memory a DataLoader's prefetched batches take, and refuse a budget that
    /dev/shm cannot hold (workers would die with SIGBUS mid-run). Returns the bytes needed.

    Every process on the machine (`local_processes`: torchrun's LOCAL_WORLD_SIZE) has its own
    workers, and they all share one /dev/shm: the need is workers x prefetch x batch bytes x
    local processes. `options` names the options that set it, for the message.
    """
    if workers == 0:
        return 0
    per_process = workers * prefetch * batch_bytes
    need = per_process * local_processes
    free = shutil.disk_usage(shm).free if shm.is_dir() else None
    each = f" x {local_processes} processes" if local_processes > 1 else ""
    log.info("%s data loader: %d workers x prefetch %d x %.1f MB batches%s = %.0f MB of shared memory%s",
             what, workers, prefetch, batch_bytes / 1e6, each, need / 1e6,
             f" ({free / 1e6:.0f} MB free in {shm})" if free is not None else "")
    if free is not None and need > free:
        raise PipelineError(
            f"options {options}: the prefetched batches need {need / 1e6:.0f} MB of shared memory"
            f"{f' ({local_processes} processes on this machine)' if local_processes > 1 else ''}, {shm} has "
            f"{free / 1e6:.0f} MB free; lower them (or give the container more, e.g. docker --shm-size)"
        )
    return need


def loader_workers(requested: int, shards: int) -> int:
    """The DataLoader workers `make_loader` starts: never more than the cores nor the shards."""
    return max(0, min(usable_workers(requested), shards))


def make_loader(dataset: ShardBatches | MixedBatches, workers: int, pin_memory: bool = False, prefetch: int = 2,
                persistent: bool = False) -> DataLoader:
    """A DataLoader over the dataset's batches (workers never exceed the cores nor the shard count).

    Each worker keeps up to `prefetch` batches ready in shared memory. `persistent`: the
    workers outlive an iteration (a training run's epochs and laps reuse them, moving the
    dataset's `SharedPosition`) instead of being started again for each.
    """
    workers = loader_workers(workers, len(dataset.shard_order()))
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
        worker_init_fn=ignore_in_worker,  # a stop signal is the main process's to handle
    )


def loader_batches(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """One iteration of `loader`; a worker's error batch becomes the PipelineError it carries."""
    for batch in loader:
        if "error" in batch:
            raise PipelineError(batch["error"])
        yield batch


def iterate_batches(
    dataset: ShardBatches | MixedBatches, workers: int, pin_memory: bool = False, prefetch: int = 2
) -> Iterator[dict[str, Any]]:
    """The dataset's batches through a `make_loader` DataLoader, once."""
    yield from loader_batches(make_loader(dataset, workers, pin_memory, prefetch))
