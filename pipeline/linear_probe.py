"""Linear-probe evaluation of frozen features, after the CLIP paper / CLIP_benchmark protocol.

A multinomial logistic regression (one weight row and one bias per class) is fitted on
standardised features with full-batch L-BFGS. The L2 strength is chosen on a seeded random
held-out part of the training set, the probe is refitted on all of the training set with the
chosen value, and top-1 / top-5 accuracy is reported on the validation set.

The fit runs in float32 on a given device (the CPU by default), in pure torch, and sets no
global torch state (no seeds, no thread counts): the split uses its own ``torch.Generator``.
Memory is bounded so that ImageNet fits (:func:`probe_memory` states the budget): the training
features are copied to the device once, as float32, and standardised in place; the loss and
its gradient are accumulated over row chunks, so only one chunk's logits exist at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.progress import Progress

log = logging.getLogger(__name__)

#: Default L2 sweep: 8 values log-spaced from 1e-6 to 1e-1.
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(10.0 ** (-6 + 5 * i / 7) for i in range(8))

#: L-BFGS history: the (step, gradient change) pairs kept.
HISTORY_SIZE = 20

#: Row chunks are sized so that one chunk's float32 logits take at most this many bytes.
CHUNK_LOGIT_BYTES = 64 * 2**20

#: Copies of the parameters alive during a fit besides the L-BFGS history (the parameters,
#: their gradient and the next one, the warm start, the best solution so far, and the line
#: search's and the update's flat vectors); counted from torch.optim.LBFGS.step, rounded up.
PARAMETER_COPIES = 16


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    ``top1`` / ``top5`` are fractions in [0, 1] on the validation set (``top5`` is top-k with
    k = min(5, num_classes)); ``weight_decay`` is the chosen L2 strength; ``sweep`` maps every
    swept weight decay to its held-out top-1 accuracy; ``also_top1`` the same classifier's top-1
    on each further evaluation set (``also``), e.g. a shifted val split.
    """

    top1: float
    top5: float
    weight_decay: float
    sweep: dict[float, float]
    also_top1: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeMemory:
    """Peak memory of the probe stage (:func:`probe_memory`), in bytes.

    ``features_bytes``: every model's stored train and val features and the labels, on the
    host; ``fit_bytes``: the largest single fit (model ``largest``) on ``device``.
    """

    features_bytes: int
    fit_bytes: int
    largest: str
    device: str
    store_dtype: torch.dtype

    @property
    def host_bytes(self) -> int:
        """Peak host memory: the stored features, plus the fit when it runs on the CPU."""
        return self.features_bytes + (self.fit_bytes if self.device == "cpu" else 0)

    @property
    def device_bytes(self) -> int:
        """Peak accelerator memory (0 when the fit runs on the CPU)."""
        return 0 if self.device == "cpu" else self.fit_bytes

    def describe(self) -> str:
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(
            self.store_dtype, str(self.store_dtype))
        peak = f"host {gib(self.host_bytes)}" + ("" if self.device == "cpu" else
                                                 f", {self.device} {gib(self.device_bytes)}")
        return (f"probe memory: features {gib(self.features_bytes)} ({dtype}, host), fit "
                f"{gib(self.fit_bytes)} on {self.device} ({self.largest}, the largest); peak {peak}")


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def default_chunk_rows(num_classes: int) -> int:
    """Rows per chunk: one chunk's float32 logits (rows x classes) within CHUNK_LOGIT_BYTES."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * num_classes))


def fit_memory_bytes(num_train: int, dim: int, num_classes: int, *, chunk_rows: int | None = None,
                     history_size: int = HISTORY_SIZE) -> int:
    """Peak bytes :func:`linear_probe` allocates for one model, on its device plus the host's index.

    The training features as float32 (N x D x 4); the row order and labels (3 x N x 8: the
    permutation, the permuted labels and their copy on the device); the L-BFGS history of
    2 x (history + 1) parameter vectors plus PARAMETER_COPIES more (C x (D + 1) x 4 bytes
    each); and one row chunk at a time, per row: its logits (4 C), its features while copied
    or standardised (two float32 copies, 8 D) and per-row scalars and top-k indices (128).
    """
    rows = min(default_chunk_rows(num_classes) if chunk_rows is None else chunk_rows, num_train)
    parameters = num_classes * (dim + 1)
    return (num_train * dim * 4 + 3 * num_train * 8
            + (2 * (history_size + 1) + PARAMETER_COPIES) * parameters * 4
            + rows * (4 * num_classes + 8 * dim + 128))


def probe_memory(num_train: int, num_val: int, feature_dims: Mapping[str, int], num_classes: int, *,
                 device: torch.device | str = "cpu", store_dtype: torch.dtype = torch.float16,
                 chunk_rows: int | None = None, history_size: int = HISTORY_SIZE) -> ProbeMemory:
    """The probe's memory budget: all models' features stored, then one model's fit at a time.

    ``feature_dims`` maps each model to its feature width. Stored: (N + V) x sum(D) values of
    ``store_dtype`` and (N + V) int64 labels, on the host. Fit: :func:`fit_memory_bytes` of the
    widest model, on ``device`` (on the host too when that is the CPU). The models' weights
    and the data loader are not counted.
    """
    if not feature_dims:
        raise ValueError("feature_dims: empty; give at least one model")
    item = torch.empty((), dtype=store_dtype).element_size()
    rows = num_train + num_val
    features = rows * sum(feature_dims.values()) * item + rows * 8
    largest = max(feature_dims, key=lambda name: feature_dims[name])  # first of the widest
    fit = fit_memory_bytes(num_train, feature_dims[largest], num_classes, chunk_rows=chunk_rows,
                           history_size=history_size)
    return ProbeMemory(features, fit, largest, torch.device(device).type, store_dtype)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of ``logits`` (N, C) whose label (N,) is among the k largest logits."""
    if logits.ndim != 2:
        raise ValueError(f"logits: expected a 2-D (N, C) tensor, got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels: expected shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("logits: empty (no rows)")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k: must be in [1, {logits.shape[1]}] (the number of classes), got {k}")
    with torch.no_grad():
        top = logits.topk(k, dim=1).indices
        hits = (top == labels.to(top.device).long()[:, None]).any(dim=1)
        return hits.float().mean().item()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    holdout_fraction: float = 0.1,
    weight_decays: Sequence[float] | None = None,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    chunk_rows: int | None = None,
    progress: Progress | None = None,
    also: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> ProbeResult:
    """Fit a linear probe on ``train_*``, choosing the L2 strength on a held-out part; score ``val_*``.

    Objective, minimised over W (num_classes, D) and b (num_classes,)::

        L(W, b) = (1/n) * sum_i CE(W x_i + b, y_i)  +  weight_decay * ||W||_F^2

    with CE the softmax cross-entropy, x_i the standardised features and the bias b not
    regularised. Standardisation is x = (f - mean) / std with mean and (population) std per
    feature computed on the part being fitted only (the sweep's training part during the sweep,
    all of ``train_features`` for the refit) and applied unchanged to the held-out / validation
    features; a std at float32 noise level (a feature constant on that part) is replaced by 1.

    Protocol: a seeded random ``holdout_fraction`` of the training rows is held out; for every
    value in ``weight_decays`` (default :data:`DEFAULT_WEIGHT_DECAYS`, 1e-6 .. 1e-1) the probe
    is fitted on the rest and scored (top-1) on the held-out rows. Values are swept from the
    strongest to the weakest regularisation, each fit warm-started from the previous solution.
    The value with the best held-out top-1 wins (ties go to the stronger regularisation); the
    probe is refitted on all training rows with it (warm-started from its sweep solution) and
    top-1 / top-k (k = min(5, num_classes)) accuracy is reported on the validation rows.

    Each fit is one full-batch ``torch.optim.LBFGS`` run (strong-Wolfe line search, history 20)
    of at most ``max_iter`` iterations, stopping early once the largest gradient entry is below
    1e-5, in float32 on ``device``. Features may be stored compactly (e.g. float16, on the host):
    the training features are copied to ``device`` as float32 once, the validation features a
    chunk at a time. The loss and gradient are summed over chunks of ``chunk_rows`` rows
    (default: :func:`default_chunk_rows`), which bounds the logits to one chunk
    (:func:`fit_memory_bytes` is the peak). ``progress``, when given, advances by one per fit
    (``len(weight_decays) + 1`` in all). The held-out split depends only on ``seed``; results can
    differ in the last digits with the device, the chunking and the number of CPU threads
    (float32 reductions).

    Raises ValueError (naming the argument) for wrong shapes, empty inputs, non-integer or
    out-of-range labels, non-finite features and out-of-range options.
    """
    _check_inputs(train_features, train_labels, val_features, val_labels, num_classes)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in (0, 1), got {holdout_fraction}")
    if max_iter < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows: must be >= 1, got {chunk_rows}")
    decays = _check_weight_decays(DEFAULT_WEIGHT_DECAYS if weight_decays is None else weight_decays)
    device = torch.device(device)
    rows = default_chunk_rows(num_classes) if chunk_rows is None else chunk_rows

    n = train_features.shape[0]
    if n < 2:
        raise ValueError(f"train_features: need at least 2 rows to hold some out, got {n}")
    with torch.no_grad():
        _check_finite(val_features, "val_features", rows)
        n_holdout = min(max(1, round(n * holdout_fraction)), n - 1)
        # The held-out rows first: the sweep's two parts are then slices (views) of one tensor.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        x = torch.empty(n, train_features.shape[1], device=device)
        _copy_rows(train_features, order, x, rows, "train_features")
        y = train_labels.detach().to("cpu", torch.long)[order].to(device)
        x_holdout, x_fit = x[:n_holdout], x[n_holdout:]
        y_holdout, y_fit = y[:n_holdout], y[n_holdout:]
        mean, std = _statistics(x_fit)
        x.sub_(mean).div_(std)  # in place: the held-out rows with the fit part's statistics

    dim = x.shape[1]
    weight = torch.zeros(num_classes, dim, device=device)
    bias = torch.zeros(num_classes, device=device)
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None  # top-1, decay, solution
    sweep: dict[float, float] = {}
    for wd in decays:  # strongest regularisation first: each fit warm-starts the next
        start = time.perf_counter()
        weight, bias, loss, iters = _fit(x_fit, y_fit, weight, bias, wd, max_iter, rows)
        with torch.no_grad():
            hits = _topk_hits(x_holdout, y_holdout, weight, bias, (1,), rows)
        sweep[wd] = hits[0] / n_holdout
        if best is None or sweep[wd] > best[0]:  # ties keep the earlier, stronger value
            best = (sweep[wd], wd, weight, bias)
        log.debug("weight_decay %.3g: held-out top-1 %.4f (loss %.4f, %d L-BFGS iterations, %.2f s)",
                  wd, sweep[wd], loss, iters, time.perf_counter() - start)
        if progress is not None:  # beside the caller's postfix (e.g. the model's name)
            progress.set_postfix(**{**progress.postfix, "weight_decay": f"{wd:.1e}",
                                    "holdout_top1": f"{sweep[wd]:.3f}"})
            progress.update()
    assert best is not None
    _, chosen, weight, bias = best

    with torch.no_grad():  # the refit: all rows, standardised with their own statistics
        _copy_rows(train_features, order, x, rows, "train_features")
        mean, std = _statistics(x)
        x.sub_(mean).div_(std)
    weight, bias, loss, iters = _fit(x, y, weight, bias, chosen, max_iter, rows)
    k = min(5, num_classes)
    with torch.no_grad():
        hits = _topk_hits(val_features, val_labels, weight, bias, (1, k), rows, device, mean, std)
    top1, top5 = hits[0] / val_features.shape[0], hits[1] / val_features.shape[0]
    also_top1 = {}
    for name, (features, labels) in (also or {}).items():  # e.g. the shifted split, by the same classifier
        _check_finite(features, name, rows)
        with torch.no_grad():
            also_top1[name] = _topk_hits(features, labels, weight, bias, (1,), rows, device, mean, std)[0] \
                / features.shape[0]
    if progress is not None:
        progress.set_postfix(**{**progress.postfix, "weight_decay": f"{chosen:.1e}", "val_top1": f"{top1:.3f}"})
        progress.update()
    log.debug("refit with weight_decay %.3g on %d rows: loss %.4f, %d iterations; val top-1 %.4f, "
              "top-5 %.4f", chosen, n, loss, iters, top1, top5)
    return ProbeResult(top1=top1, top5=top5, weight_decay=chosen, sweep=dict(sorted(sweep.items())),
                       also_top1=also_top1)


@torch.no_grad()
def objective(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_decay: float,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe's loss L(W, b) and its gradients (dL/dW, dL/db), summed over row chunks of ``x``.

    The gradient of the mean cross-entropy with respect to the logits is
    (softmax(logits) - onehot(y)) / n; only one chunk's logits exist at a time.
    """
    n = x.shape[0]
    loss = torch.zeros((), device=x.device)
    grad_weight = torch.zeros_like(weight)
    grad_bias = torch.zeros_like(bias)
    for start in range(0, n, chunk_rows):
        x_chunk, y_chunk = x[start:start + chunk_rows], y[start:start + chunk_rows, None]
        logits = torch.addmm(bias, x_chunk, weight.T)
        log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
        loss += (log_norm - logits.gather(1, y_chunk)).sum()
        probs = logits.sub_(log_norm).exp_()  # softmax, in the logits' memory
        probs.scatter_add_(1, y_chunk, torch.full_like(log_norm, -1.0))  # minus the one-hot labels
        grad_weight.addmm_(probs.T, x_chunk)
        grad_bias += probs.sum(dim=0)
    loss = loss / n + weight_decay * weight.pow(2).sum()
    grad_weight.div_(n).add_(weight, alpha=2 * weight_decay)
    return loss, grad_weight, grad_bias.div_(n)


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_decay: float,
    max_iter: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One L-BFGS run from (weight, bias) (not modified); the solution, final loss, iterations."""
    w, b = weight.detach().clone(), bias.detach().clone()  # gradients come from `objective`
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=HISTORY_SIZE, line_search_fn="strong_wolfe",
        tolerance_grad=1e-5, tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = objective(x, y, w, b, weight_decay, chunk_rows)
        return loss

    optimizer.step(closure)
    loss, _, _ = objective(x, y, w, b, weight_decay, chunk_rows)
    iters = int(optimizer.state[w].get("n_iter", 0))
    return w, b, float(loss), iters


def _copy_rows(source: torch.Tensor, order: torch.Tensor, out: torch.Tensor, chunk_rows: int,
               name: str) -> None:
    """out[i] = source[order[i]] as float32 on out's device, a chunk at a time; checks finiteness."""
    for start in range(0, order.shape[0], chunk_rows):
        index = order[start:start + chunk_rows].to(source.device)
        chunk = out[start:start + chunk_rows]
        chunk.copy_(source.detach()[index].to(out.device))  # moved as stored (e.g. float16), then widened
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")


def _statistics(fit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (population) std of ``fit``; a std at float32 noise level becomes 1."""
    std, mean = torch.std_mean(fit, dim=0, correction=0)
    # A feature constant on `fit` has std ~ float32 rounding of its mean; give it scale 1.
    return mean, torch.where(std > 1e-6 * mean.abs() + 1e-20, std, torch.ones_like(std))


def _topk_hits(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ks: Sequence[int],
    chunk_rows: int,
    device: torch.device | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> list[int]:
    """For each k, the number of rows whose label is among the k largest logits, a chunk at a time.

    Rows are moved to ``device`` as float32 and standardised with (mean, std) when given.
    """
    hits = [0] * len(ks)
    for start in range(0, features.shape[0], chunk_rows):
        x = features[start:start + chunk_rows]
        if mean is not None and std is not None:  # a copy, standardised in place
            x = x.to(device or weight.device, torch.float32, copy=True).sub_(mean).div_(std)
        logits = torch.addmm(bias, x, weight.T)
        y = labels[start:start + chunk_rows].to(logits.device, torch.long)[:, None]
        top = logits.topk(max(ks), dim=1).indices
        for i, k in enumerate(ks):
            hits[i] += int((top[:, :k] == y).any(dim=1).sum())
    return hits


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: must be an int >= 2, got {num_classes!r}")
    for name, features in (("train_features", train_features), ("val_features", val_features)):
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{name}: expected a 2-D (N, D) tensor, got {shape}")
        if features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"{name}: empty, shape {tuple(features.shape)}")
        if not features.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {features.dtype}")
    if val_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"val_features: has {val_features.shape[1]} features per row, train_features has "
            f"{train_features.shape[1]}"
        )
    for name, labels, features in (("train_labels", train_labels, train_features),
                                   ("val_labels", val_labels, val_features)):
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{name}: expected a 1-D (N,) tensor, got {shape}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"{name}: has {labels.shape[0]} rows, its features have {features.shape[0]}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got {labels.dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name}: values must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
                             f"got range [{low}, {high}]")


def _check_weight_decays(weight_decays: Sequence[float]) -> list[float]:
    """Distinct values, strongest first; each finite and >= 0."""
    values = [float(v) for v in weight_decays]
    if not values:
        raise ValueError("weight_decays: empty; give at least one value")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"weight_decays: values must be finite and >= 0, got {bad}")
    return sorted(set(values), reverse=True)


def _check_finite(features: torch.Tensor, name: str, chunk_rows: int) -> None:
    for start in range(0, features.shape[0], chunk_rows):  # chunked: no full-size mask
        if not bool(torch.isfinite(features[start:start + chunk_rows]).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
