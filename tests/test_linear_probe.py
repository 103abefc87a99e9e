"""The linear probe: accuracy on separable / random problems, the sweep, standardisation, the
chunked objective, float16 storage, progress, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.linear_probe import DEFAULT_WEIGHT_DECAYS, ProbeResult, linear_probe, objective, topk_accuracy
from pipeline.progress import Progress


def blobs(n: int, num_classes: int, dim: int, spread: float, seed: int,
          centres: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian blobs: unit-variance noise around random class centres scaled by `spread`."""
    generator = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = spread * torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    features = centres[labels] + torch.randn(n, dim, generator=generator)
    return features, labels, centres


def split_blobs(num_classes: int = 10, dim: int = 32, spread: float = 3.0, n_train: int = 1000,
                n_val: int = 500, seed: int = 0):
    x_train, y_train, centres = blobs(n_train, num_classes, dim, spread, seed)
    x_val, y_val, _ = blobs(n_val, num_classes, dim, spread, seed + 1, centres)
    return x_train, y_train, x_val, y_val


def test_separable_blobs_are_solved():
    x_train, y_train, x_val, y_val = split_blobs(spread=3.0)
    result = linear_probe(x_train, y_train, x_val, y_val, 10)
    assert isinstance(result, ProbeResult)
    assert result.top1 >= 0.99
    assert result.top5 == 1.0  # the true class is among the top 5 whenever it is the top 1
    assert set(result.sweep) == set(DEFAULT_WEIGHT_DECAYS)
    assert 6 <= len(result.sweep) <= 10


def test_random_labels_stay_near_chance():
    num_classes = 10
    generator = torch.Generator().manual_seed(3)
    x_train, x_val = torch.randn(2000, 32, generator=generator), torch.randn(2000, 32, generator=generator)
    y_train = torch.randint(0, num_classes, (2000,), generator=generator)
    y_val = torch.randint(0, num_classes, (2000,), generator=generator)
    result = linear_probe(x_train, y_train, x_val, y_val, num_classes)
    assert abs(result.top1 - 1 / num_classes) < 0.04
    assert abs(result.top5 - 5 / num_classes) < 0.06


def test_chosen_weight_decay_is_the_sweep_argmax():
    # Overlapping blobs in many dimensions with few rows: the regularisation matters.
    x_train, y_train, x_val, y_val = split_blobs(num_classes=8, dim=64, spread=0.25, n_train=400)
    decays = [1e-5, 1e-3, 1e-1, 1.0]
    result = linear_probe(x_train, y_train, x_val, y_val, 8, weight_decays=decays, seed=1)
    assert set(result.sweep) == set(decays)
    assert result.weight_decay in result.sweep
    assert result.sweep[result.weight_decay] == max(result.sweep.values())
    assert len(set(result.sweep.values())) > 1  # the sweep is not trivially flat here
    # the held-out top-1 of the well-conditioned values, by hand (their optimum is unique and reached
    # whatever the warm start): the seeded 10% held out, the rest's statistics, mean CE + wd ||W||^2
    assert {wd: result.sweep[wd] for wd in (1.0, 1e-1)} == \
        {wd: held_out_top1_by_hand(x_train, y_train, 8, wd, seed=1) for wd in (1.0, 1e-1)}


def held_out_top1_by_hand(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, seed: int) -> float:
    """linear_probe's sweep figure for one weight decay, with autograd and torch's L-BFGS run to convergence."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_holdout = round(0.1 * len(x))
    held_out, fit = order[:n_holdout], order[n_holdout:]
    mean, std = x[fit].mean(0), x[fit].std(0, unbiased=False)
    x_fit, x_held_out = (x[fit] - mean) / std, (x[held_out] - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=1000, tolerance_grad=1e-8, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_fit @ weight.T + bias, y[fit]) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((x_held_out @ weight.T + bias).argmax(-1) == y[held_out]).sum().item() / n_holdout


def test_same_seed_same_result_other_seed_other_split():
    x_train, y_train, x_val, y_val = split_blobs(num_classes=8, dim=64, spread=0.25, n_train=400)
    decays = [1e-4, 1e-2, 1.0]
    first = linear_probe(x_train, y_train, x_val, y_val, 8, weight_decays=decays, seed=5)
    again = linear_probe(x_train, y_train, x_val, y_val, 8, weight_decays=decays, seed=5)
    assert first == again


def test_scaling_features_does_not_change_accuracy():
    # Hard enough that top-1 is well below 1, so a different fit would show.
    x_train, y_train, x_val, y_val = split_blobs(num_classes=10, dim=32, spread=0.35)
    base = linear_probe(x_train, y_train, x_val, y_val, 10)
    scaled = linear_probe(1000 * x_train, y_train, 1000 * x_val, y_val, 10)
    assert 0.3 < base.top1 < 0.95
    assert scaled.top1 == pytest.approx(base.top1, abs=0.01)
    assert scaled.weight_decay == base.weight_decay


def test_constant_feature_is_harmless():
    x_train, y_train, x_val, y_val = split_blobs(spread=3.0)
    x_train[:, 0] = 7.0
    x_val[:, 0] = -3.0  # differs on val: must not blow up the logits
    result = linear_probe(x_train, y_train, x_val, y_val, 10, weight_decays=[1e-3])
    assert result.top1 >= 0.99


def test_works_inside_no_grad_and_with_two_classes():
    x_train, y_train, x_val, y_val = split_blobs(num_classes=2, spread=3.0)
    with torch.no_grad():
        result = linear_probe(x_train, y_train, x_val, y_val, 2, weight_decays=[1e-3])
    assert result.top1 >= 0.99
    assert result.top5 == 1.0  # top-k with k = min(5, num_classes) = 2


def test_objective_is_the_autograd_loss_and_gradient_for_any_chunking():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(203, 16, generator=generator)
    y = torch.randint(0, 6, (203,), generator=generator)
    weight, bias = 0.5 * torch.randn(6, 16, generator=generator), 0.5 * torch.randn(6, generator=generator)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    weight_before = weight.clone()
    expected = F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.01 * w.pow(2).sum()
    expected.backward()
    for chunk_rows in (203, 1000, 64, 7, 1):
        loss, grad_weight, grad_bias = objective(x, y, weight, bias, 0.01, chunk_rows)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_weight, w.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_bias, b.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, weight_before)  # not changed in place


def test_chunked_fit_gives_the_full_batch_result():
    # Hard enough (top-1 ~0.6) that a different solution would move the accuracies.
    x_train, y_train, x_val, y_val = split_blobs(num_classes=10, dim=32, spread=0.35)
    full = linear_probe(x_train, y_train, x_val, y_val, 10)
    for chunk_rows in (37, 1):
        chunked = linear_probe(x_train, y_train, x_val, y_val, 10, chunk_rows=chunk_rows)
        assert chunked.weight_decay == full.weight_decay
        # chunks sum in another order: L-BFGS may end a hair apart and flip a sample or two
        assert chunked.top1 == pytest.approx(full.top1, abs=0.02)
        assert chunked.top5 == pytest.approx(full.top5, abs=0.02)
        assert chunked.sweep == pytest.approx(full.sweep, abs=0.02)


def test_float16_features_give_the_result_of_their_float32_values():
    x_train, y_train, x_val, y_val = split_blobs(num_classes=10, dim=32, spread=0.35)
    stored = linear_probe(x_train.half(), y_train, x_val.half(), y_val, 10, weight_decays=[1e-4, 1e-2])
    widened = linear_probe(x_train.half().float(), y_train, x_val.half().float(), y_val, 10,
                           weight_decays=[1e-4, 1e-2])
    exact = linear_probe(x_train, y_train, x_val, y_val, 10, weight_decays=[1e-4, 1e-2])
    assert stored == widened  # float16 -> float32 is exact: the same fit
    assert stored.top1 == pytest.approx(exact.top1, abs=0.01)  # rounding to float16 is noise


def test_progress_advances_once_per_fit():
    x_train, y_train, x_val, y_val = split_blobs(n_train=200, n_val=50)
    progress = Progress(4, "probe fits", "fit", terminal=False)
    progress.set_postfix(model="blobs")
    result = linear_probe(x_train, y_train, x_val, y_val, 10, weight_decays=[1e-4, 1e-2, 1.0],
                          progress=progress)
    assert progress.done == 4  # three sweep fits and the refit
    assert progress.postfix["model"] == "blobs"  # the caller's postfix is kept
    assert progress.postfix["val_top1"] == f"{result.top1:.3f}"
    assert "4/4 fit" in progress.line()


def test_topk_accuracy_hand_example():
    logits = torch.tensor([
        [0.1, 0.5, 0.3, 0.0],   # order 1, 2, 0, 3
        [2.0, 1.0, 0.0, -1.0],  # order 0, 1, 2, 3
        [0.0, 0.2, 0.9, 0.4],   # order 2, 3, 1, 0
    ])
    labels = torch.tensor([2, 0, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 3) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k"):
        topk_accuracy(logits, labels, 5)
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(logits, labels[:2], 1)


def test_errors_name_the_argument():
    x_train, y_train, x_val, y_val = split_blobs(n_train=50, n_val=20)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(x_train, y_train[:-1], x_val, y_val, 10)
    with pytest.raises(ValueError, match="val_features"):
        linear_probe(x_train, y_train, x_val[:, :-1], y_val, 10)
    with pytest.raises(ValueError, match="val_labels"):
        linear_probe(x_train, y_train, x_val, y_val[:, None], 10)
    with pytest.raises(ValueError, match="train_features"):
        linear_probe(x_train[:0], y_train[:0], x_val, y_val, 10)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(x_train, y_train + 10, x_val, y_val, 10)
    with pytest.raises(ValueError, match="val_labels"):
        linear_probe(x_train, y_train, x_val, y_val - 1 - y_val.max(), 10)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(x_train, y_train.float(), x_val, y_val, 10)
    with pytest.raises(ValueError, match="weight_decays"):
        linear_probe(x_train, y_train, x_val, y_val, 10, weight_decays=[])
    with pytest.raises(ValueError, match="weight_decays"):
        linear_probe(x_train, y_train, x_val, y_val, 10, weight_decays=[-1.0])
    with pytest.raises(ValueError, match="holdout_fraction"):
        linear_probe(x_train, y_train, x_val, y_val, 10, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_probe(x_train, y_train, x_val, y_val, 10, chunk_rows=0)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x_train, y_train, x_val, y_val, 1)
    x_nan = x_train.clone()
    x_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="train_features"):
        linear_probe(x_nan, y_train, x_val, y_val, 10)
    x_inf = x_val.half()
    x_inf[-1, -1] = float("inf")  # in the last of several chunks
    with pytest.raises(ValueError, match="val_features"):
        linear_probe(x_train, y_train, x_inf, y_val, 10, chunk_rows=7)


def test_shared_student_pass_gives_both_encoders_exact_outputs():
    """probe runs the student's backbone once for its pooled-feature and embedding rows: both equal
    what separate passes give, and a batch the backbone encoder did not see gets a full pass."""
    from pipeline.student import Student
    from stages.probe import backbone_and_embedding_encoders

    torch.manual_seed(0)
    model = Student("resnet18", 16, head="mlp", head_hidden=32).eval()
    features, embeddings = backbone_and_embedding_encoders(model, torch.device("cpu"))
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    other = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # the encoders run channels_last: so do the separate passes
        expected_features, expected_embeddings = model.features(channels_last(pixels)), model(channels_last(pixels))
        expected_other = model(channels_last(other))
    assert torch.equal(features(pixels), expected_features)
    assert torch.equal(embeddings(pixels), expected_embeddings)
    assert torch.equal(embeddings(other), expected_other)


def channels_last(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.contiguous(memory_format=torch.channels_last)


def test_bf16_probe_encoders_agree_with_fp32():
    """probe extracts features under bf16 autocast (where the CPU has native bf16, and on GPU):
    float32 out, within bf16 rounding of the fp32 features and embeddings."""
    from pipeline.student import Student
    from stages.probe import backbone_and_embedding_encoders, backbone_encoder

    torch.manual_seed(0)
    model = Student("resnet18", 16, head="mlp", head_hidden=32).eval()
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    reference = backbone_encoder(model, cpu, "fp32")(pixels)
    features, embeddings = backbone_and_embedding_encoders(model, cpu, "bf16")
    low = features(pixels)
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.999
    reference_embeddings = backbone_and_embedding_encoders(model, cpu, "fp32")[1](pixels)
    assert (embeddings(pixels) * reference_embeddings).sum(-1).min() > 0.999  # unit vectors
