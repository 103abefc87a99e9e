"""The teacher cache: one HDF5 file, its layout defined here for writer and reader alike.

Layout (FORMAT_VERSION 1):

  /  attributes: format_version, teacher_identity, embed_dim, teacher_image_size,
                 teacher_mean, teacher_std, views_per_image, view_fields, crop_scale,
                 crop_ratio, flip, view_seed, prompt_digest, prompt_set, anchor_mode,
                 num_classes, num_anchors, shard_digest, topk, package_version
  prompts/text (P,) str, prompts/class (P,) int32, prompts/embeddings (P, D) float32
  anchors/embeddings (K, D) float32, anchors/class (K,) int32
  shards/name (S,) str, shards/image_start (S,) int64, shards/image_count (S,) int64
  images/key (N,) str, images/shard (N,) int32, images/position (N,) int32, images/label (N,) int32
  views/image (N*V,) int32           -- view rows of image i are i*V ... i*V+V-1
  views/params (N*V, 5) float32      -- x0, y0, width, height (fractions of the image), flip
  views/similarities (N*V, K) float16           -- when topk == 0: cosine to every anchor
  views/topk_index (N*V, k) uint16|int32, views/topk_similarity (N*V, k) float16  -- topk > 0
  views/embeddings (N*V, D) float16  -- optional teacher image embeddings

Images (and so views) are stored shard by shard, in shard order: a shard's rows are one
contiguous slice. Similarities are cosines before any temperature; the teacher
distribution is softmax(similarity / tau), computed when reading.

Top-k reconstruction rule: anchors outside the stored top-k get similarity -inf, so the
reconstructed distribution is the full softmax truncated to its top-k and renormalised.
Its total-variation distance to the full distribution equals the probability mass the
full distribution puts outside the top-k (bounded by `topk_mass_outside`).

Writing is crash-safe: each completed shard is written to its own part file (atomically
renamed); `join_parts` assembles the final file under a temporary name and renames it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.views import VIEW_FIELDS

FORMAT_VERSION = 1
STR = h5py.string_dtype(encoding="utf-8")
VIEW_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class CacheHeader:
    """Everything that identifies a cache: written as root attributes, checked on reading."""

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
    format_version: int = FORMAT_VERSION
    view_fields: str = ",".join(VIEW_FIELDS)
    package_version: str = __version__

    def to_attrs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: Any, path: Path) -> CacheHeader:
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise PipelineError(
                f"{path}: cache format version {version}, this csm-distill reads version "
                f"{FORMAT_VERSION}; re-run `python -m pipeline precompute`"
            )
        values = {}
        for name, f in cls.__dataclass_fields__.items():
            value = attrs[name]
            if isinstance(value, np.ndarray):
                value = tuple(value.tolist())
            elif isinstance(value, np.generic):
                value = value.item()
            if f.type in ("bool",):
                value = bool(value)
            values[name] = value
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


def topk_mass_outside(similarities: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Per row, the probability mass softmax(s / tau) puts outside its top-k anchors."""
    p = torch.softmax(similarities.float() / tau, dim=-1)
    return 1 - p.topk(k, dim=-1).values.sum(-1)


def write_part(out: Path, part: ShardPart, header: CacheHeader) -> None:
    """One shard's outputs to its own file, written under a temporary name and renamed."""
    path = part_path(out, part.shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["shard"] = part.shard
        f.attrs["shard_digest"] = header.shard_digest
        f.attrs["corrupt"] = json.dumps(part.corrupt)
        f["keys"] = np.array(part.keys, dtype=object).astype(STR) if part.keys else np.empty(0, STR)
        f["positions"] = part.positions.astype(np.int32)
        f["labels"] = part.labels.astype(np.int32)
        f["params"] = part.params.astype(np.float32)
        if header.topk:
            index, value = compress_topk(part.similarities, header.topk)
            f["topk_index"], f["topk_similarity"] = index, value
        else:
            f["similarities"] = part.similarities.astype(np.float16)
        if part.embeddings is not None:
            f["embeddings"] = part.embeddings.astype(np.float16)
    os.replace(tmp, path)


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
            path.unlink()  # a part is renamed only when complete; this one is not ours to trust
    return done


def write_state(out: Path, state: dict[str, Any]) -> None:
    path = parts_dir(out) / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("state.json.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


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
    """Assemble the final cache from the per-shard parts; returns the corrupt keys.

    Built under `<out>.tmp` and renamed, so `out` is either absent or complete.
    """
    tmp = out.with_name(out.name + ".tmp")
    V = header.views_per_image
    corrupt: list[str] = []
    parts = [part_path(out, s) for s in range(len(shard_names))]
    counts = []
    for path in parts:
        with h5py.File(path, "r") as f:
            counts.append(int(f["positions"].shape[0]))
    total = int(sum(counts))
    with h5py.File(tmp, "w") as f:
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
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        g["image_start"] = starts
        g["image_count"] = np.array(counts, dtype=np.int64)
        images = f.create_group("images")
        images.create_dataset("key", (total,), dtype=STR)
        for name in ("shard", "position", "label"):
            images.create_dataset(name, (total,), dtype=np.int32)
        views = f.create_group("views")
        rows = total * V
        chunk = (min(VIEW_CHUNK_ROWS, max(1, rows)),)
        views.create_dataset("image", data=np.repeat(np.arange(total, dtype=np.int32), V),
                             chunks=chunk if rows else None)
        views.create_dataset("params", (rows, len(VIEW_FIELDS)), dtype=np.float32,
                             chunks=chunk + (len(VIEW_FIELDS),) if rows else None)
        K, D = header.num_anchors, header.embed_dim
        if header.topk:
            k = min(header.topk, K)
            views.create_dataset("topk_index", (rows, k), dtype=topk_index_dtype(K),
                                 chunks=chunk + (k,) if rows else None)
            views.create_dataset("topk_similarity", (rows, k), dtype=np.float16,
                                 chunks=chunk + (k,) if rows else None)
        else:
            views.create_dataset("similarities", (rows, K), dtype=np.float16,
                                 chunks=chunk + (K,) if rows else None)
        if header.store_embeddings:
            views.create_dataset("embeddings", (rows, D), dtype=np.float16,
                                 chunks=chunk + (D,) if rows else None)
        for shard, (path, start, count) in enumerate(zip(parts, starts, counts, strict=True)):
            with h5py.File(path, "r") as part:
                corrupt.extend(json.loads(part.attrs["corrupt"]))
                image_rows = slice(int(start), int(start + count))
                view_rows = slice(int(start) * V, int(start + count) * V)
                images["key"][image_rows] = part["keys"][:]
                images["shard"][image_rows] = shard
                images["position"][image_rows] = part["positions"][:]
                images["label"][image_rows] = part["labels"][:]
                for name in ("params", "similarities", "topk_index", "topk_similarity", "embeddings"):
                    if name in part:
                        views[name][view_rows] = part[name][:]
    os.replace(tmp, out)
    return corrupt


def remove_parts(out: Path) -> None:
    directory = parts_dir(out)
    if directory.is_dir():
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


# --------------------------------------------------------------------------- reading


@dataclass
class ShardTargets:
    """One shard's rows: image positions in the shard, view parameters and similarities."""

    positions: np.ndarray  # (n,)
    labels: np.ndarray  # (n,)
    params: np.ndarray  # (n, V, 5), or (n, 5) for chosen views
    similarities: np.ndarray  # (n, V, K) float32, or (n, K) for chosen views (top-k expanded, -inf)
    embeddings: np.ndarray | None = None  # (n, V, D) / (n, D) float32 teacher image embeddings, if asked

    def row_of_position(self) -> dict[int, int]:
        return {int(p): i for i, p in enumerate(self.positions)}


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
                self.shard_names = [s.decode() if isinstance(s, bytes) else s
                                    for s in f["shards/name"][:]]
                self.image_start = f["shards/image_start"][:]
                self.image_count = f["shards/image_count"][:]
        except (OSError, KeyError) as err:
            raise PipelineError(f"{self.path}: not a readable teacher cache ({err})") from None
        self._file: h5py.File | None = None
        self._pid: int | None = None

    @property
    def file(self) -> h5py.File:
        # A handle must not cross a fork: reopen in every process that reads.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
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

    def anchors(self) -> torch.Tensor:
        return torch.from_numpy(self.file["anchors/embeddings"][:])

    def anchor_classes(self) -> torch.Tensor:
        return torch.from_numpy(self.file["anchors/class"][:].astype(np.int64))

    def prompts(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.file["prompts/text"][:]]

    def shard_targets(self, shard: int, chosen: np.ndarray | None = None,
                      with_embeddings: bool = False) -> ShardTargets:
        """A shard's rows, read in one slice per dataset.

        With `chosen` (one view index per image), only those views are kept, so memory holds
        one view per image whatever V is; otherwise all V views of every image. With
        `with_embeddings`, also the stored teacher image embeddings (an error if there are none).
        """
        if with_embeddings and not self.header.store_embeddings:
            raise PipelineError(
                f"{self.path}: holds no teacher image embeddings; re-run precompute with --store-embeddings"
            )
        start, count = int(self.image_start[shard]), int(self.image_count[shard])
        V, K = self.header.views_per_image, self.header.num_anchors
        images = slice(start, start + count)
        views = slice(start * V, (start + count) * V)
        keep = slice(None) if chosen is None else np.arange(count) * V + chosen
        f = self.file
        params = f["views/params"][views][keep]
        if self.header.topk:
            similarities = expand_topk(f["views/topk_index"][views][keep],
                                       f["views/topk_similarity"][views][keep], K)
        else:
            similarities = f["views/similarities"][views][keep].astype(np.float32)
        embeddings = f["views/embeddings"][views][keep].astype(np.float32) if with_embeddings else None
        if chosen is None:
            params, similarities = params.reshape(count, V, -1), similarities.reshape(count, V, K)
            if embeddings is not None:
                embeddings = embeddings.reshape(count, V, -1)
        return ShardTargets(
            positions=f["images/position"][images],
            labels=f["images/label"][images],
            params=params,
            similarities=similarities,
            embeddings=embeddings,
        )

    def similarities(self, rows: slice | np.ndarray) -> np.ndarray:
        """Full float32 similarities of view rows (top-k expanded)."""
        f = self.file
        if self.header.topk:
            return expand_topk(f["views/topk_index"][rows], f["views/topk_similarity"][rows],
                               self.header.num_anchors)
        return f["views/similarities"][rows].astype(np.float32)
