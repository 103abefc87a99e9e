"""Linear-probe evaluation of frozen features, after the CLIP paper / CLIP_benchmark protocol.

A multinomial logistic regression (one weight row and one bias per class) is fitted on
standardised features with full-batch L-BFGS. The L2 strength is chosen on a seeded random
held-out part of the training set, the probe is refitted on all of the training set with the
chosen value, and top-1 / top-5 accuracy is reported on the validation set.

Everything runs in float32 on the CPU, in pure torch, and sets no global torch state (no
seeds, no thread counts): the split uses its own ``torch.Generator``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: Default L2 sweep: 8 values log-spaced from 1e-6 to 1e-1.
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(10.0 ** (-6 + 5 * i / 7) for i in range(8))


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    ``top1`` / ``top5`` are fractions in [0, 1] on the validation set (``top5`` is top-k with
    k = min(5, num_classes)); ``weight_decay`` is the chosen L2 strength; ``sweep`` maps every
    swept weight decay to its held-out top-1 accuracy.
    """

    top1: float
    top5: float
    weight_decay: float
    sweep: dict[float, float]


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
    1e-5, in float32 on the CPU; inputs on other devices / dtypes are copied. The held-out split
    depends only on ``seed``; results can differ in the last digits with the number of CPU
    threads (float32 reductions).

    Raises ValueError (naming the argument) for wrong shapes, empty inputs, non-integer or
    out-of-range labels, non-finite features and out-of-range options.
    """
    _check_inputs(train_features, train_labels, val_features, val_labels, num_classes)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction: must be in (0, 1), got {holdout_fraction}")
    if max_iter < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    decays = _check_weight_decays(DEFAULT_WEIGHT_DECAYS if weight_decays is None else weight_decays)

    with torch.no_grad():
        x_train = train_features.detach().to("cpu", torch.float32)
        y_train = train_labels.detach().to("cpu", torch.long)
        x_val = val_features.detach().to("cpu", torch.float32)
        y_val = val_labels.detach().to("cpu", torch.long)
        _check_finite(x_train, "train_features")
        _check_finite(x_val, "val_features")

        n = x_train.shape[0]
        if n < 2:
            raise ValueError(f"train_features: need at least 2 rows to hold some out, got {n}")
        n_holdout = min(max(1, round(n * holdout_fraction)), n - 1)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
        fit_idx, holdout_idx = order[n_holdout:], order[:n_holdout]
        x_fit, x_holdout = _standardise(x_train[fit_idx], x_train[holdout_idx])
        y_fit, y_holdout = y_train[fit_idx], y_train[holdout_idx]

    dim = x_train.shape[1]
    weight = torch.zeros(num_classes, dim)
    bias = torch.zeros(num_classes)
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    sweep: dict[float, float] = {}
    for wd in decays:  # strongest regularisation first: each fit warm-starts the next
        start = time.perf_counter()
        weight, bias, loss, iters = _fit(x_fit, y_fit, weight, bias, wd, max_iter)
        with torch.no_grad():
            sweep[wd] = topk_accuracy(torch.addmm(bias, x_holdout, weight.T), y_holdout, 1)
        solutions[wd] = (weight, bias)
        log.debug("weight_decay %.3g: held-out top-1 %.4f (loss %.4f, %d L-BFGS iterations, %.2f s)",
                  wd, sweep[wd], loss, iters, time.perf_counter() - start)

    best = max(sweep.values())
    chosen = next(wd for wd in decays if sweep[wd] == best)  # decays run strongest first

    with torch.no_grad():
        x_all, x_val_std = _standardise(x_train, x_val)
    weight, bias, loss, iters = _fit(x_all, y_train, *solutions[chosen], chosen, max_iter)
    with torch.no_grad():
        val_logits = torch.addmm(bias, x_val_std, weight.T)
        top1 = topk_accuracy(val_logits, y_val, 1)
        top5 = topk_accuracy(val_logits, y_val, min(5, num_classes))
    log.debug("refit with weight_decay %.3g on %d rows: loss %.4f, %d iterations; val top-1 %.4f, "
              "top-5 %.4f", chosen, n, loss, iters, top1, top5)
    return ProbeResult(top1=top1, top5=top5, weight_decay=chosen, sweep=dict(sorted(sweep.items())))


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_decay: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One L-BFGS run from (weight, bias) (not modified); the solution, final loss, iterations."""
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-5, tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may be inside torch.no_grad()
        optimizer.step(closure)
        with torch.no_grad():
            loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + weight_decay * w.pow(2).sum()
    iters = int(optimizer.state[w].get("n_iter", 0))
    return w.detach(), b.detach(), float(loss), iters


def _standardise(fit: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(f - mean) / std with per-feature statistics of ``fit``, applied to ``fit`` and ``others``."""
    mean = fit.mean(dim=0)
    std = fit.std(dim=0, correction=0)
    # A feature constant on `fit` has std ~ float32 rounding of its mean; give it scale 1.
    std = torch.where(std > 1e-6 * mean.abs() + 1e-20, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (fit, *others))


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


def _check_finite(features: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
