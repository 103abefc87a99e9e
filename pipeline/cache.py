"""The teacher cache: one HDF5 file and its parts, the layout defined here for writer and reader alike.

Layout (FORMAT_VERSION 3):

  /  attributes: format_version, teacher_identity, embed_dim, teacher_image_size,
                 teacher_mean, teacher_std, views_per_image, view_fields, crop_scale,
                 crop_ratio, flip, view_seed, prompt_digest, prompt_set, anchor_mode,
                 num_classes, num_anchors, shard_digest, topk, package_version,
                 teacher_device (informational, absent from older caches)
  prompts/text (P,) str, prompts/class (P,) int32, prompts/embeddings (P, D) float32
  anchors/embeddings (K, D) float32, anchors/class (K,) int32
  shards/name (S,) str, shards/image_start (S,) int64, shards/image_count (S,) int64
  images/key (N,) str, images/shard (N,) int32, images/position (N,) int32, images/label (N,) int32
  views/image (N*V,) int32           -- the image of every view row
  views/params (N*V, 5) float32      -- x0, y0, width, height (fractions of the image), flip
  views/similarities (N*V, K) float16           -- when topk == 0: cosine to every anchor
  views/topk_index (N*V, k) uint16|int32, views/topk_similarity (N*V, k) float16  -- topk > 0
  views/embeddings (N*V, D) float16  -- optional teacher image embeddings

`teacher_identity` is `pipeline.teacher`'s: the weights' sha256 (and a tag's download source),
architecture and preprocessing digests, activation and the precision the teacher ran at, with
the names it was given; `require` compares what decides the outputs, never the names.
`prompt_digest` covers the prompt strings, their classes and the anchor mode (version 2 also
mixed in the teacher's names, so a renamed checkpoint no longer fitted its own cache).

Images are stored shard by shard, in shard order. A shard's view rows are one contiguous
slice and, within it, view-major: row `start*V + v*count + j` is view v of the shard's j-th
image (start, count: `shards/image_start`, `shards/image_count`). An epoch of stage two uses
one view per image, and it takes the same view index for every image of a shard
(`pipeline.training.epoch_view`), so it reads exactly one contiguous block per shard: the
rows it uses and no others.

Storage: the per-view datasets (all but `views/image`) are HDF5 virtual datasets over the
part files in `<file>.parts/` (one per shard, referenced by relative path, so the file and
its parts directory move together), so joining writes no second copy of the views. A
reader checks that every part is present; a missing part is a one-line error, never fill
values.

Similarities are cosines before any temperature; the teacher distribution is
softmax(similarity / tau), computed when reading.

Top-k reconstruction rule: anchors outside the stored top-k get similarity -inf, so the
reconstructed distribution is the full softmax truncated to its top-k and renormalised.
Its total-variation distance to the full distribution equals the probability mass the
full distribution puts outside the top-k (bounded by `topk_mass_outside`).

Writing is crash-safe: each completed shard is written to its own part file (atomically
renamed); `join_parts` writes the index file under a temporary name and renames it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import torch

from pipeline import __version__, atomic
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.shards import shard_list_digest
from pipeline.views import VIEW_FIELDS

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
STR = h5py.string_dtype(encoding="utf-8")
DIGEST = "S64"  # a sha256 in hex
REQUIRED = ("prompts/text", "prompts/class", "prompts/embeddings", "anchors/embeddings", "anchors/class",
            "shards/name", "shards/image_start", "shards/image_count", "images/key", "images/shard",
            "images/position", "images/label", "views/image", "views/params", "checksums/images",
            "checksums/params")


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclass(frozen=True)
class CacheHeader:
    """Everything that identifies a cache: written as root attributes, checked on reading.

    `teacher_device` (the GPU's name, or cpu) only informs: two GPUs give the same cache up to
    rounding, so no check compares it (`INFORMATIONAL`), and a cache written before it existed
    reads back with it empty.
    """

    INFORMATIONAL: ClassVar[tuple[str, ...]] = ("teacher_device",)

    teacher_identity: str
    embed_dim: int
    teacher_image_size: int
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]
    views_per_image: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    view_seed: int
    prompt_digest: str
    prompt_set: str
    anchor_mode: str
    num_classes: int
    num_anchors: int
    shard_digest: str
    topk: int
    store_embeddings: bool
    teacher_device: str = ""
    format_version: int = FORMAT_VERSION
    view_fields: str = ",".join(VIEW_FIELDS)
    package_version: str = __version__

    def to_attrs(self) -> dict[str, Any]:
        """The root attributes. An empty informational field is left out, so that an older
        cache's header gives the attributes it was written with (a distill run's fingerprint)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if not (k in self.INFORMATIONAL and v == "")}

    @classmethod
    def from_attrs(cls, attrs: Any, path: Path) -> CacheHeader:
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise PipelineError(
                f"{path}: cache format version {version}, this csm-distill reads version "
                f"{FORMAT_VERSION}; re-run `python -m pipeline precompute`"
            )
        values = {}
        for f in dataclasses.fields(cls):  # not __dataclass_fields__: it lists INFORMATIONAL too
            if f.name in cls.INFORMATIONAL and f.name not in attrs:
                continue  # written before the field existed: its default
            value = attrs[f.name]
            if isinstance(value, np.ndarray):
                value = tuple(value.tolist())
            elif isinstance(value, np.generic):
                value = value.item()
            if f.type in ("bool",):
                value = bool(value)
            values[f.name] = value
        return cls(**values)


@dataclass
class ShardPart:
    """The teacher outputs of one shard, as written by stage one before joining."""

    shard: int
    keys: list[str]
    positions: np.ndarray  # (n,) int32
    labels: np.ndarray  # (n,) int32
    params: np.ndarray  # (n*V, 5) float32
    similarities: np.ndarray  # (n*V, K) float16 (full, before top-k compression)
    embeddings: np.ndarray | None = None  # (n*V, D) float16
    corrupt: list[str] = field(default_factory=list)


def stored_bytes_per_view(num_anchors: int, views_per_image: int, topk: int = 0, embed_dim: int = 0,
                          store_embeddings: bool = False, key_bytes: int = 32) -> float:
    """Bytes per view of the per-view and per-image datasets, from the layout above.

    views: image index (4) + params (5 x 4) + similarities (K x 2) or top-k (k x (index + 2))
    + optional embeddings (D x 2); images: key (~key_bytes, variable-length string heap),
    shard, position, label (3 x 4), shared by the V views of the image. Prompts and anchors are
    a fixed overhead not counted here.
    """
    per_view = 4 + 4 * len(VIEW_FIELDS)
    if topk:
        per_view += min(topk, num_anchors) * (topk_index_dtype(num_anchors).itemsize + 2)
    else:
        per_view += num_anchors * 2
    if store_embeddings:
        per_view += embed_dim * 2
    return per_view + (key_bytes + 12) / views_per_image


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_path(out: Path, shard: int) -> Path:
    return parts_dir(out) / f"part-{shard:06d}.h5"


def topk_index_dtype(num_anchors: int) -> np.dtype:
    return np.dtype(np.uint16) if num_anchors <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def compress_topk(similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the k largest similarities per row, largest first."""
    tensor = torch.from_numpy(similarities.astype(np.float32))
    values, indices = tensor.topk(min(k, tensor.shape[1]), dim=1)
    return indices.numpy().astype(topk_index_dtype(similarities.shape[1])), values.numpy().astype(
        np.float16)


def expand_topk(indices: np.ndarray, values: np.ndarray, num_anchors: int) -> np.ndarray:
    """Full (rows, K) float32 similarities from top-k: missing anchors get -inf."""
    full = np.full((indices.shape[0], num_anchors), -np.inf, dtype=np.float32)
    np.put_along_axis(full, indices.astype(np.int64), values.astype(np.float32), axis=1)
    return full


def dense_similarities(values: torch.Tensor, indices: torch.Tensor | None, num_anchors: int) -> torch.Tensor:
    """Float32 similarities to every anchor from targets as stored, on their device: full rows
    (float16) widened, or top-k (values, anchor indices) scattered into -inf rows (as `expand_topk`)."""
    if indices is None:
        return values.float()
    full = torch.full((*values.shape[:-1], num_anchors), -torch.inf, dtype=torch.float32, device=values.device)
    return full.scatter_(-1, indices.long(), values.float())


def topk_mass_outside(similarities: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Per row, the probability mass softmax(s / tau) puts outside its top-k anchors."""
    p = torch.softmax(similarities.float() / tau, dim=-1)
    return 1 - p.topk(k, dim=-1).values.sum(-1)


PER_VIEW = ("params", "similarities", "topk_index", "topk_similarity", "embeddings")


def view_major(rows: np.ndarray, views_per_image: int) -> np.ndarray:
    """(n*V, ...) rows in image-major order (image j's views together) -> view-major (view v's images together)."""
    n = rows.shape[0] // views_per_image
    return rows.reshape((n, views_per_image) + rows.shape[1:]).swapaxes(0, 1).reshape(rows.shape)


def image_major(rows: np.ndarray, views_per_image: int) -> np.ndarray:
    """The inverse of `view_major`: (V*n, ...) -> (n, V, ...)."""
    n = rows.shape[0] // views_per_image
    return rows.reshape((views_per_image, n) + rows.shape[1:]).swapaxes(0, 1)


def block_digests(rows: np.ndarray, views_per_image: int) -> list[str]:
    """sha256 of each view block of view-major rows: block v is rows v*n ... (v+1)*n - 1."""
    n = rows.shape[0] // views_per_image
    return [hashlib.sha256(np.ascontiguousarray(rows[v * n:(v + 1) * n]).tobytes()).hexdigest()
            for v in range(views_per_image)]


def image_digest(positions: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a shard's per-image rows (positions and labels, int32)."""
    return hashlib.sha256(positions.astype(np.int32).tobytes() + labels.astype(np.int32).tobytes()).hexdigest()


def write_part(out: Path, part: ShardPart, header: CacheHeader) -> None:
    """One shard's outputs to its own file, written under a temporary name and renamed.

    `part` holds the views image-major (as stage one computes them); the part file stores
    them view-major and contiguous (not chunked), so a read of one view block touches
    exactly its bytes.
    """
    path = part_path(out, part.shard)
    V = header.views_per_image
    # Built in memory, then written as bytes: a full disk is then a plain failed write, which the
    # atomic writer reports in one line, not an HDF5 library left with a half-flushed file.
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs["shard"] = part.shard
        f.attrs["shard_digest"] = header.shard_digest
        f.attrs["views_per_image"] = V
        f.attrs["num_anchors"] = header.num_anchors
        f.attrs["corrupt"] = json.dumps(part.corrupt)
        f["keys"] = np.array(part.keys, dtype=object).astype(STR) if part.keys else np.empty(0, STR)
        f["positions"] = part.positions.astype(np.int32)
        f["labels"] = part.labels.astype(np.int32)
        views = {"params": view_major(part.params.astype(np.float32), V)}
        if header.topk:
            index, value = compress_topk(part.similarities, header.topk)
            views["topk_index"], views["topk_similarity"] = view_major(index, V), view_major(value, V)
        else:
            views["similarities"] = view_major(part.similarities.astype(np.float16), V)
        if part.embeddings is not None:
            views["embeddings"] = view_major(part.embeddings.astype(np.float16), V)
        for name, rows in views.items():
            f[name] = rows
        # Checksums of what the reader reads at once (one view block of one dataset), kept
        # in the part and copied into the cache file by the join; every read checks them.
        f.attrs["checksums"] = json.dumps({
            "images": image_digest(part.positions, part.labels),
            **{name: block_digests(rows, V) for name, rows in views.items()},
        })
    atomic.write_bytes(path, image.getbuffer())


def read_part(path: Path) -> ShardPart:
    """A part file back as a ShardPart (views image-major, similarities as stored: full or top-k expanded)."""
    with h5py.File(path, "r") as f:
        V = int(f.attrs["views_per_image"])
        similarities = (f["similarities"][:] if "similarities" in f else
                        expand_topk(f["topk_index"][:], f["topk_similarity"][:], int(f.attrs["num_anchors"])))
        return ShardPart(
            shard=int(f.attrs["shard"]),
            keys=[k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]],
            positions=f["positions"][:],
            labels=f["labels"][:],
            params=image_major(f["params"][:], V).reshape(-1, len(VIEW_FIELDS)),
            similarities=image_major(similarities, V).reshape(-1, similarities.shape[-1]),
            embeddings=(image_major(f["embeddings"][:], V).reshape(-1, f["embeddings"].shape[-1])
                        if "embeddings" in f else None),
            corrupt=json.loads(f.attrs["corrupt"]),
        )


def completed_parts(out: Path, shard_digest: str) -> set[int]:
    """Shards whose part file is complete and belongs to the same shard list."""
    done = set()
    directory = parts_dir(out)
    if not directory.is_dir():
        return done
    for path in sorted(directory.glob("part-*.h5")):
        try:
            with h5py.File(path, "r") as f:
                if f.attrs["shard_digest"] != shard_digest:
                    raise PipelineError(
                        f"{path}: left by a partial run over a different shard list; the shards "
                        f"changed since. Delete {directory} to start over"
                    )
                done.add(int(f.attrs["shard"]))
        except OSError:
            path.unlink(missing_ok=True)  # a part is renamed only when complete; this one is not ours to trust
    return done


def write_state(out: Path, state: dict[str, Any]) -> None:
    atomic.write_text(parts_dir(out) / "state.json", json.dumps(state, indent=1, sort_keys=True))


def read_state(out: Path) -> dict[str, Any] | None:
    path = parts_dir(out) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def join_parts(
    out: Path,
    header: CacheHeader,
    shard_names: Sequence[str],
    prompts: Sequence[str],
    prompt_classes: np.ndarray,
    prompt_embeddings: np.ndarray,
    anchors: np.ndarray,
    anchor_classes: np.ndarray,
) -> list[str]:
    """Write the cache file over the per-shard parts; returns the corrupt keys.

    The per-view datasets become virtual datasets mapping each shard's rows to its part
    file, so the views are not copied: the peak disk use of a join is the parts plus the
    small index (prompts, anchors, per-image rows). Built under `<out>.tmp` and renamed, so
    `out` is either absent or complete.
    """
    V = header.views_per_image
    corrupt: list[str] = []
    parts = [part_path(out, s) for s in range(len(shard_names))]
    counts, shapes = [], {}
    for path in parts:
        with h5py.File(path, "r") as f:
            counts.append(int(f["positions"].shape[0]))
            for name in PER_VIEW:
                if name in f:
                    shapes[name] = (f[name].shape[1:], f[name].dtype)
    total = int(sum(counts))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    image = io.BytesIO()  # in memory, then written as bytes (see write_part)
    with h5py.File(image, "w") as f:
        f.attrs.update(header.to_attrs())
        g = f.create_group("prompts")
        g["text"] = np.array(list(prompts), dtype=object).astype(STR)
        g["class"] = prompt_classes.astype(np.int32)
        g["embeddings"] = prompt_embeddings.astype(np.float32)
        g = f.create_group("anchors")
        g["embeddings"] = anchors.astype(np.float32)
        g["class"] = anchor_classes.astype(np.int32)
        g = f.create_group("shards")
        g["name"] = np.array(list(shard_names), dtype=object).astype(STR)
        g["image_start"] = starts
        g["image_count"] = np.array(counts, dtype=np.int64)
        images = f.create_group("images")
        images.create_dataset("key", (total,), dtype=STR)
        for name in ("shard", "position", "label"):
            images.create_dataset(name, (total,), dtype=np.int32)
        view_image = np.empty(total * V, dtype=np.int32)
        layouts = {name: h5py.VirtualLayout((total * V,) + shape, dtype)
                   for name, (shape, dtype) in shapes.items()}
        sums = f.create_group("checksums")
        sums.attrs["anchors"] = array_digest(anchors.astype(np.float32))
        sums.create_dataset("images", (len(parts),), dtype=DIGEST)
        for name in layouts:
            sums.create_dataset(name, (len(parts), V), dtype=DIGEST)
        progress = Progress(len(parts), "join", "part")
        for shard, (path, start, count) in enumerate(zip(parts, starts, counts, strict=True)):
            progress.update()
            with h5py.File(path, "r") as part:
                corrupt.extend(json.loads(part.attrs["corrupt"]))
                recorded = json.loads(part.attrs["checksums"])
                sums["images"][shard] = recorded["images"]
                for name in layouts:
                    sums[name][shard] = recorded[name]
                image_rows = slice(int(start), int(start + count))
                images["key"][image_rows] = part["keys"][:]
                images["shard"][image_rows] = shard
                images["position"][image_rows] = part["positions"][:]
                images["label"][image_rows] = part["labels"][:]
                view_image[start * V:(start + count) * V] = np.tile(np.arange(start, start + count), V)
                if count == 0:
                    continue
                relative = os.path.relpath(path, out.parent)
                for name, layout in layouts.items():
                    layout[int(start) * V:int(start + count) * V] = h5py.VirtualSource(
                        relative, name, shape=part[name].shape)
        views = f.create_group("views")
        views["image"] = view_image
        for name, layout in layouts.items():
            fill = np.nan if np.issubdtype(layout.dtype, np.floating) else 0
            views.create_virtual_dataset(name, layout, fillvalue=fill)
        progress.close()
    atomic.write_bytes(out, image.getbuffer())
    return corrupt


# --------------------------------------------------------------------------- reading


@dataclass
class ShardTargets:
    """One shard's rows: image positions in the shard, view parameters and similarities."""

    positions: np.ndarray  # (n,)
    labels: np.ndarray  # (n,)
    params: np.ndarray  # (n, V, 5), or (n, 5) for one view
    similarities: np.ndarray  # (n, V, K) float32, or (n, K) for one view (top-k expanded, -inf)
    embeddings: np.ndarray | None = None  # (n, V, D) / (n, D) float32 teacher image embeddings, if asked
    # Read with expand=False, as stored: similarities and embeddings float16, and with top-k,
    # similarities (.., k) float16 and these anchor indices (.., k); `dense_similarities` expands.
    topk_index: np.ndarray | None = None

    def row_of_position(self) -> dict[int, int]:
        return {int(p): i for i, p in enumerate(self.positions)}


def view_sources(f: h5py.File, path: Path) -> list[Path]:
    """The part files the per-view datasets of cache file `f` (at `path`) map to, one per non-empty shard."""
    params = f["views/params"]
    if not params.is_virtual:
        return []
    names = dict.fromkeys(source.file_name for source in params.virtual_sources())
    return [path.parent / name for name in names]


class TeacherCache:
    """Read access to a cache file; opened lazily so each DataLoader worker has its own handle."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(
                f"{self.path}: teacher cache not found; create it with `python -m pipeline precompute`"
            )
        try:
            with h5py.File(self.path, "r") as f:
                self.header = CacheHeader.from_attrs(f.attrs, self.path)
                missing = [name for name in REQUIRED if name not in f]
                if not missing:
                    self.shard_names = [s.decode() if isinstance(s, bytes) else s for s in f["shards/name"][:]]
                    self.image_start = f["shards/image_start"][:]
                    self.image_count = f["shards/image_count"][:]
                    self.part_files = view_sources(f, self.path)
        except (OSError, KeyError) as err:
            raise PipelineError(f"{self.path}: not a readable teacher cache ({err}); re-run precompute") from None
        if missing:
            raise PipelineError(f"{self.path}: damaged, {', '.join(missing[:3])} missing; re-run precompute")
        missing = [path for path in self.part_files if not path.is_file()]
        if missing:
            raise PipelineError(
                f"{self.path}: {len(missing)} part file(s) missing, e.g. {missing[0]}; the views live in "
                f"{missing[0].parent}, which moves with the cache file (or re-run precompute)"
            )
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def require(self, *, teacher_identity: str | None = None, prompt_digest: str | None = None,
                prompts: str = "", shards: Sequence[Path] | None = None, labels: bool = False,
                embeddings: bool = False, fix: str = "re-run precompute") -> None:
        """The one check that this cache fits a run: every stage that reads a cache asks it.

        Checks what is given: the teacher (by what decides its outputs, `teacher.identity_difference`:
        a renamed file or another spelling of the model is the same teacher), the prompt set (digest;
        `prompts` describes the params' side in the message), the shard list (names and
        contents), labels on every image, stored teacher image embeddings. A mismatch is a
        one-line PipelineError saying what differs and `fix`.
        """
        header = self.header
        if teacher_identity is not None:
            from pipeline.teacher import identity_difference, identity_warnings

            difference = identity_difference(header.teacher_identity, teacher_identity)
            if difference:
                raise PipelineError(f"{self.path}: made by another teacher than the params' ({difference}); {fix}")
            for warning in identity_warnings(header.teacher_identity, teacher_identity):
                log.warning("%s: %s", self.path, warning)
        if prompt_digest is not None and header.prompt_digest != prompt_digest:
            raise PipelineError(
                f"{self.path}: anchor digest {header.prompt_digest[:12]} ({header.prompt_set} prompts, "
                f"{header.anchor_mode} anchors) differs from the params' {prompt_digest[:12]}"
                f"{f' ({prompts})' if prompts else ''}; {fix} or fix the prompt options"
            )
        if shards is not None:
            names = [Path(s).name for s in shards]
            if self.shard_names != names:
                raise PipelineError(
                    f"{self.path}: computed over {len(self.shard_names)} shards ({self.shard_names[0]} ...), "
                    f"not the {len(names)} in {Path(shards[0]).parent}; re-run precompute"
                )
            if header.shard_digest != shard_list_digest(shards):
                raise PipelineError(
                    f"{self.path}: the shards in {Path(shards[0]).parent} changed since it was computed "
                    f"(same names, other contents); re-run precompute"
                )
        if labels and (self.labels() < 0).any():
            raise PipelineError(f"{self.path}: has unlabelled images; the supervised reference needs labels")
        if embeddings and not header.store_embeddings:
            raise PipelineError(
                f"{self.path}: holds no teacher image embeddings; re-run precompute with --store-embeddings"
            )

    def require_student(self, path: str | Path, checkpoint: dict[str, Any], fix: str) -> None:
        """A distilled student's checkpoint must record this cache's prompt set and teacher (by content)."""
        from pipeline.teacher import identity_difference

        if checkpoint.get("anchor_digest") != self.header.prompt_digest:
            raise PipelineError(f"{path}: distilled against another prompt set than {self.path}'s "
                                f"(anchor digest {str(checkpoint.get('anchor_digest'))[:12]}, cache "
                                f"{self.header.prompt_digest[:12]}); {fix}")
        difference = identity_difference(self.header.teacher_identity, checkpoint.get("teacher_identity", ""),
                                         sides=("cache", "student"))
        if difference:
            raise PipelineError(f"{path}: distilled from another teacher than {self.path}'s ({difference}); {fix}")

    @property
    def file(self) -> h5py.File:
        # A handle must not cross a fork: reopen in every process that reads.
        if self._file is None or self._pid != os.getpid():
            # No data-sieve buffer: HDF5 would read up to 64 KB around every small contiguous
            # read (three times the bytes of a demo shard's view parameters); the reads here
            # are whole contiguous blocks, so reading exactly them is the fastest anyway.
            access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
            access.set_sieve_buf_size(0)
            self._file = h5py.File(h5py.h5f.open(os.fsencode(self.path), h5py.h5f.ACC_RDONLY, fapl=access))
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    @property
    def num_images(self) -> int:
        return int(self.image_count.sum())

    def stored_bytes(self) -> int:
        """Bytes on disk: the cache file and its part files."""
        return self.path.stat().st_size + sum(path.stat().st_size for path in self.part_files)

    def view_storage_bytes(self) -> int:
        """Bytes stored for the per-view and per-image datasets (prompts and anchors left out)."""
        f = self.file
        total = sum(f["images"][name].id.get_storage_size() for name in f["images"])
        total += f["views/image"].id.get_storage_size()
        for path in self.part_files:
            with h5py.File(path, "r") as part:
                total += sum(part[name].id.get_storage_size() for name in PER_VIEW if name in part)
        return total

    def view_row_bytes(self) -> int:
        """Stored bytes of one view row over the per-view datasets (all but views/image)."""
        f = self.file
        return sum(f["views"][name].dtype.itemsize * int(np.prod(f["views"][name].shape[1:]))
                   for name in PER_VIEW if name in f["views"])

    @property
    def num_views(self) -> int:
        return self.num_images * self.header.views_per_image

    def anchors(self) -> torch.Tensor:
        anchors = self.file["anchors/embeddings"][:]
        if array_digest(anchors) != self.file["checksums"].attrs["anchors"]:
            raise PipelineError(
                f"{self.path}: anchors/embeddings do not match the checksum recorded when the cache was written "
                f"(damaged bytes); re-run precompute"
            )
        return torch.from_numpy(anchors)

    def anchor_classes(self) -> torch.Tensor:
        return torch.from_numpy(self.file["anchors/class"][:].astype(np.int64))

    def prompts(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.file["prompts/text"][:]]

    def prompt_classes(self) -> torch.Tensor:
        return torch.from_numpy(self.file["prompts/class"][:].astype(np.int64))

    def prompt_embeddings(self) -> torch.Tensor:
        return torch.from_numpy(self.file["prompts/embeddings"][:])

    def labels(self) -> np.ndarray:
        """(N,) class index of every image, -1 where unknown."""
        return self.file["images/label"][:]

    def view_rows(self, shard: int, view: int | None = None) -> slice:
        """The rows of a shard (all views), or of one view index of it: one contiguous slice."""
        start, count = int(self.image_start[shard]), int(self.image_count[shard])
        V = self.header.views_per_image
        if view is None:
            return slice(start * V, (start + count) * V)
        return slice(start * V + view * count, start * V + (view + 1) * count)

    def shard_targets(self, shard: int, view: int | None = None,
                      with_embeddings: bool = False, expand: bool = True) -> ShardTargets:
        """A shard's rows, read in one contiguous slice per dataset and checked against their checksums.

        With `view` (one view index for every image of the shard, as stage two replays
        them), only that view's rows are read; otherwise all V views of every image,
        shaped (n, V, ...). With `with_embeddings`, also the stored teacher image embeddings
        (an error if there are none). Data that does not match the checksums recorded when
        the cache was written (flipped bytes, a part file from another run) is a one-line
        error naming the shard. With `expand` False, the targets stay as stored (see
        ShardTargets): stage two ships them so and expands them on its device.
        """
        if with_embeddings and not self.header.store_embeddings:
            raise PipelineError(
                f"{self.path}: holds no teacher image embeddings; re-run precompute with --store-embeddings"
            )
        start, count = int(self.image_start[shard]), int(self.image_count[shard])
        V = self.header.views_per_image
        if view is not None and not 0 <= view < V:
            raise ValueError(f"view {view}: the cache has {V} views per image")
        views = range(V) if view is None else [view]
        f = self.file
        images = slice(start, start + count)
        positions, labels = f["images/position"][images], f["images/label"][images]
        self.check(shard, "images", None, image_digest(positions, labels))
        params = self.read_views("params", shard, views)
        topk_index = None
        if self.header.topk:
            topk_index = self.read_views("topk_index", shard, views)
            similarities = self.read_views("topk_similarity", shard, views)
            if expand:
                similarities, topk_index = expand_topk(topk_index, similarities, self.header.num_anchors), None
        else:
            similarities = self.read_views("similarities", shard, views)
        embeddings = self.read_views("embeddings", shard, views) if with_embeddings else None
        if expand:
            similarities = similarities.astype(np.float32)
            embeddings = embeddings.astype(np.float32) if embeddings is not None else None
        if view is None:
            params, similarities = image_major(params, V), image_major(similarities, V)
            embeddings = image_major(embeddings, V) if embeddings is not None else None
            topk_index = image_major(topk_index, V) if topk_index is not None else None
        return ShardTargets(positions=positions, labels=labels, params=params, similarities=similarities,
                            embeddings=embeddings, topk_index=topk_index)

    def read_views(self, name: str, shard: int, views: Sequence[int]) -> np.ndarray:
        """The rows of dataset views/`name` for some view indices of a shard (contiguous when
        they are), each view block checked against its checksum."""
        first, last = self.view_rows(shard, views[0]), self.view_rows(shard, views[-1])
        try:
            rows = self.file[f"views/{name}"][first.start:last.stop]
        except (OSError, KeyError) as err:
            raise PipelineError(f"{self.path}: shard {shard} ({self.shard_names[shard]}) unreadable "
                                f"({err}); check it with `python -m pipeline verify {self.path}`") from None
        count = int(self.image_count[shard])
        for i, view in enumerate(views):
            self.check(shard, name, view, array_digest(rows[i * count:(i + 1) * count]))
        return rows

    def check(self, shard: int, name: str, view: int | None, digest: str) -> None:
        """Refuse data whose sha256 is not the one recorded for it when the cache was written."""
        sums = self.file[f"checksums/{name}"]
        recorded = sums[shard] if view is None else sums[shard, view]
        if recorded.decode() != digest:
            where = f"view {view} of " if view is not None else ""
            raise PipelineError(
                f"{self.path}: {name} of {where}shard {shard} ({self.shard_names[shard]}) do not match the checksum "
                f"recorded when the cache was written (damaged bytes, or a part file from another run); "
                f"`python -m pipeline verify {self.path}` lists the bad shards"
            )

    def similarities(self, rows: slice | np.ndarray) -> np.ndarray:
        """Full float32 similarities of view rows (top-k expanded)."""
        f = self.file
        if self.header.topk:
            return expand_topk(f["views/topk_index"][rows], f["views/topk_similarity"][rows],
                               self.header.num_anchors)
        return f["views/similarities"][rows].astype(np.float32)


def replicate_views(source: str | Path, target: str | Path, factor: int) -> None:
    """A copy of a cache with every image's views repeated `factor` times (V -> factor x V).

    For measuring how reading scales with the cache's size (`bench`), through the same
    writer as stage one.
    """
    reader = TeacherCache(source)
    target = Path(target)
    header = dataclasses.replace(reader.header, views_per_image=reader.header.views_per_image * factor)
    V = reader.header.views_per_image

    def tiled(rows: np.ndarray | None) -> np.ndarray | None:
        if rows is None:
            return None
        per_image = rows.reshape((-1, V) + rows.shape[1:])
        return np.concatenate([per_image] * factor, axis=1).reshape((-1,) + rows.shape[1:])

    for shard in range(len(reader.shard_names)):
        part = read_part(part_path(reader.path, shard))
        write_part(target, dataclasses.replace(
            part, params=tiled(part.params), similarities=tiled(part.similarities).astype(np.float16),
            embeddings=tiled(part.embeddings)), header)
    join_parts(target, header, reader.shard_names, reader.prompts(), reader.prompt_classes().numpy(),
               reader.prompt_embeddings().numpy(), reader.anchors().numpy(), reader.anchor_classes().numpy())
    reader.close()
