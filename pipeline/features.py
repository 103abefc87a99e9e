"""Frozen features of a shard split and zero-shot classification against anchors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.shards import (
    Sample,
    ShardBatches,
    check_shared_memory,
    iterate_batches,
    loader_workers,
    sample_count,
)
from pipeline.views import eval_view

PREFETCH = 2  # batches each DataLoader worker keeps ready in shared memory


def centre_view_batches(shards: Sequence[Path], sizes: dict[str, int], batch_size: int) -> ShardBatches:
    """Shards in file order; each sample gives its evaluation view (`eval_view`: shorter side
    resized, centre crop, as CLIP evaluates) at every named resolution."""

    def prepare(sample: Sample, _: object) -> dict[str, torch.Tensor]:
        return {name: eval_view(sample.image, size) for name, size in sizes.items()}

    return ShardBatches(shards, batch_size, prepare)


def centre_view_batch_bytes(sizes: Iterable[int], batch_size: int) -> int:
    """Bytes of the tensors of one `centre_view_batches` batch, as its worker ships them through
    shared memory: a uint8 view per distinct resolution, and each image's position and label."""
    return batch_size * (sum(3 * size * size for size in set(sizes)) + 8 + 8)


def check_loader_memory(what: str, options: str, shards: Sequence[Path], sizes: Iterable[int], batch_size: int,
                        workers: int, local_processes: int = 1) -> int:
    """`check_shared_memory` for `extract_features` over `shards`, before its loader starts: the
    workers it runs (`loader_workers`) x PREFETCH x the batch bytes."""
    return check_shared_memory(what, options, loader_workers(workers, len(shards)), PREFETCH,
                               centre_view_batch_bytes(sizes, batch_size), local_processes)


class RowBuffer:
    """Rows appended batch by batch into one preallocated (capacity, D) tensor on the CPU.

    With the right capacity nothing is copied: the rows are written in place and `rows()` is a
    view, so the peak is the features themselves, not twice them as with a final concatenation.
    A wrong or missing capacity still works (the buffer doubles when full).
    """

    def __init__(self, capacity: int, dtype: torch.dtype) -> None:
        self.capacity, self.dtype, self.filled = max(capacity, 1), dtype, 0
        self.data: torch.Tensor | None = None

    def append(self, batch: torch.Tensor) -> None:
        if self.data is None:
            self.data = torch.empty(self.capacity, *batch.shape[1:], dtype=self.dtype)
        end = self.filled + batch.shape[0]
        if end > self.data.shape[0]:
            grown = torch.empty(max(end, 2 * self.data.shape[0]), *self.data.shape[1:], dtype=self.dtype)
            grown[:self.filled] = self.data[:self.filled]
            self.data = grown
        self.data[self.filled:end] = batch
        self.filled = end

    def rows(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype) if self.data is None else self.data[:self.filled]


@torch.no_grad()
def extract_features(
    shards: Sequence[Path],
    encoders: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]],
    batch_size: int,
    workers: int,
    desc: str = "features",
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
    captions: list[str | None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Run every encoder (name -> (resolution, fn on [0,1] pixels)) over the shards' evaluation views.

    Images are decoded once and resized once per distinct resolution. Returns the features
    per encoder (N, D) of `dtype` on CPU (float16 halves the memory of float32; each batch is
    converted on the encoder's device before it is moved), the labels (N,) and the keys of
    corrupt samples. Raises PipelineError when a feature is beyond the range of `dtype`.
    `pin_memory` (for a CUDA encoder): batches arrive in pinned memory, so that the encoders'
    copies to the device do not first go through a pageable staging buffer. `captions`, when
    given, gets each returned row's caption (None for a sample without one), in row order.
    """
    sizes = {f"pixels_{size}": size for size, _ in encoders.values()}
    loader = iterate_batches(centre_view_batches(shards, sizes, batch_size), workers, pin_memory=pin_memory,
                             prefetch=PREFETCH)
    expected = sample_count(shards)
    features = {name: RowBuffer(expected or batch_size, dtype) for name in encoders}
    labels, corrupt = RowBuffer(expected or batch_size, torch.long), []
    largest = torch.finfo(dtype).max
    progress = Progress(expected, desc, "img")
    for batch in loader:
        corrupt.extend(batch["corrupt"])
        if not batch["keys"]:
            continue
        for name, (size, encode) in encoders.items():
            encoded = encode(batch[f"pixels_{size}"])
            if float(encoded.abs().max()) > largest:  # float16 stops at 65504: inf is no feature
                raise PipelineError(f"{desc}: features of {name} exceed the {dtype} range "
                                    f"(|x| > {largest:g}); store them as torch.float32")
            features[name].append(encoded.to(dtype).cpu())
        labels.append(batch["labels"])
        if captions is not None:
            captions.extend(batch["captions"])
        progress.update(len(batch["keys"]))
    progress.close()
    return {name: rows.rows() for name, rows in features.items()}, labels.rows(), corrupt


def zero_shot_scores(
    embeddings: torch.Tensor, anchors: torch.Tensor, anchor_classes: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class scores (N, C): the best cosine similarity over each class's anchors."""
    similarity = torch.nn.functional.normalize(embeddings.float(), dim=-1) @ anchors.float().T
    scores = torch.full((embeddings.shape[0], num_classes), float("-inf"))
    index = anchor_classes.long()[None, :].expand_as(similarity)
    return scores.scatter_reduce(1, index, similarity, reduce="amax")


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())
