"""PSD's soft-target contrastive loss (a reconstruction): alpha = 0 is CLIP's loss, targets carry no gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses import caption_contrastive_loss, caption_targets, psd_loss, psd_targets


def embeddings(seed: int = 0, batch: int = 6, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    return image, text, torch.tensor(2.0)


def test_alpha_zero_is_exactly_clips_loss():
    image, text, scale = embeddings()
    clip = caption_contrastive_loss(image, text, scale, torch.arange(6))["loss"]  # distinct captions
    by_hand = (F.cross_entropy(scale.exp() * image @ text.T, torch.arange(6))
               + F.cross_entropy(scale.exp() * text @ image.T, torch.arange(6))) / 2
    for rho in (0.0, 0.5, 1.0):
        assert torch.allclose(psd_loss(image, text, scale, alpha=0.0, rho=rho)["loss"], clip, atol=1e-6)
    assert torch.allclose(clip, by_hand, atol=1e-6)
    assert torch.allclose(psd_loss(image, text, scale, alpha=0.7, rho=0.0)["loss"], clip, atol=1e-6)


def test_chosen_rows_mix_the_identity_with_the_models_own_distribution():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    forward, backward = psd_targets(logits, alpha=0.3, rho=1.0)
    assert torch.allclose(forward, 0.7 * torch.eye(5) + 0.3 * logits.softmax(-1))
    assert torch.allclose(backward, 0.7 * torch.eye(5) + 0.3 * logits.T.softmax(-1))
    assert torch.allclose(forward.sum(-1), torch.ones(5)) and torch.allclose(backward.sum(-1), torch.ones(5))
    big = torch.randn(40, 40, generator=torch.Generator().manual_seed(2))
    some, _ = psd_targets(big, alpha=0.3, rho=0.5, generator=torch.Generator().manual_seed(3))
    soft = sum(not torch.equal(row, torch.eye(40)[i]) for i, row in enumerate(some))
    assert 10 < soft < 30  # about rho of the rows are soft, the others one-hot


def test_the_soft_targets_carry_no_gradient():
    image, text, scale = embeddings(seed=2)
    loss = psd_loss(image, text, scale, alpha=0.5, rho=1.0)["loss"]
    loss.backward()
    logits = scale.exp() * image.detach() @ text.detach().T
    forward, backward = psd_targets(logits, 0.5, 1.0)
    image2, text2 = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    fixed = scale.exp() * image2 @ text2.T  # the same loss with the targets as constants
    expected = (-(forward * F.log_softmax(fixed, -1)).sum(-1).mean()
                - (backward * F.log_softmax(fixed.T, -1)).sum(-1).mean()) / 2
    expected.backward()
    assert torch.allclose(image.grad, image2.grad, atol=1e-6) and torch.allclose(text.grad, text2.grad, atol=1e-6)


def test_repeated_captions_stay_positives_under_psd():
    image, text, scale = embeddings(seed=3)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])  # two captions appear twice
    clip = caption_contrastive_loss(image, text, scale, ids)["loss"]
    assert torch.allclose(psd_loss(image, text, scale, alpha=0.0, rho=1.0, caption_ids=ids)["loss"], clip, atol=1e-6)
    logits = scale.exp() * image.detach() @ text.detach().T
    forward, backward = psd_targets(logits, alpha=0.4, rho=1.0, hard=caption_targets(ids))
    assert torch.allclose(forward[1], 0.6 * torch.tensor([0, 0.5, 0.5, 0, 0, 0]) + 0.4 * logits[1].softmax(-1))
    assert torch.allclose(backward.sum(-1), torch.ones(6))
