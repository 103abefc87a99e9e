"""Losses as pure functions; each returns a dict of named terms, "loss" being the one to minimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def csm_loss(
    teacher_similarities: torch.Tensor,
    student_embeddings: torch.Tensor,
    anchors: torch.Tensor,
    tau_teacher: float,
    tau_student: float,
) -> dict[str, torch.Tensor]:
    """Cross-modal similarity matching.

    p_T = softmax(s_T / tau_teacher) over the K anchors, from the cached cosine similarities
    s_T (B, K) (entries of -inf, from a top-k cache, get probability 0);
    p_S = softmax(cos(z_S, a_k) / tau_student) with the student embeddings z_S (B, D) and the
    same anchors (K, D); loss = KL(p_T || p_S), averaged over the batch.
    Also returns "agreement": the share of rows where argmax p_S == argmax p_T.
    """
    teacher_log_p = F.log_softmax(teacher_similarities.float() / tau_teacher, dim=-1)
    student_cos = F.normalize(student_embeddings.float(), dim=-1) @ F.normalize(
        anchors.float(), dim=-1).T
    student_log_p = F.log_softmax(student_cos / tau_student, dim=-1)
    teacher_p = teacher_log_p.exp()
    # p_T (log p_T - log p_S), with 0 * log 0 = 0 for anchors a top-k cache left out.
    kl = (torch.special.xlogy(teacher_p, teacher_p) - teacher_p * student_log_p).sum(-1)
    agreement = (student_cos.argmax(-1) == teacher_similarities.argmax(-1)).float().mean()
    return {"loss": kl.mean(), "kl": kl.mean().detach(), "agreement": agreement.detach()}


def embedding_loss(teacher_embeddings: torch.Tensor, student_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embedding (feature) distillation: 1 - cos(z_S, z_T), averaged over the batch.

    The feature loss of CLIP-KD and DIME-FM-style methods, against the teacher image
    embeddings a cache stores with `--store-embeddings`. Also returns "cosine", the mean cosine.
    """
    cosine = F.cosine_similarity(student_embeddings.float(), teacher_embeddings.float(), dim=-1)
    return {"loss": (1 - cosine).mean(), "cosine": cosine.mean().detach()}


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of class logits (the supervised reference)."""
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return {"loss": loss, "ce": loss.detach(), "accuracy": accuracy.detach()}


def caption_targets(caption_ids: torch.Tensor) -> torch.Tensor:
    """(B, B) contrastive targets: row i uniform over the columns whose caption equals caption i
    (the same string is not a negative of itself); the identity when all captions differ."""
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    return same / same.sum(-1, keepdim=True)


def soft_contrastive_loss(logits: torch.Tensor, image_to_text: torch.Tensor,
                          text_to_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric cross-entropy of image-text logits (B, B) against target rows of either direction."""
    image_loss = -(image_to_text * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    text_loss = -(text_to_image * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    loss = (image_loss + text_loss) / 2
    return {"loss": loss, "contrastive": loss.detach()}


def caption_contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Symmetric CLIP loss where pairs with identical caption text are all positives
    (`caption_targets`); with all-distinct captions this is exactly CLIP's InfoNCE.
    Embeddings are unit norm; logits = exp(logit_scale) * cos."""
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.T
    targets = caption_targets(caption_ids)
    return soft_contrastive_loss(logits, targets, targets.T)


def psd_targets(logits: torch.Tensor, alpha: float, rho: float, generator: torch.Generator | None = None,
                hard: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets of progressive self-distillation (PSD), a reconstruction.

    Andonian et al. (CVPR 2022) distil the model's own knowledge into soft image-text
    alignment targets for a subset of every minibatch; their exact formula is not public to
    us. This reconstruction: a random subset of rows (each row with probability `rho`) gets
    (1 - alpha) * hard + alpha * softmax(logits) (the model's own distribution, no gradient),
    the other rows the hard targets: `hard` (B, B), the identity by default (or
    `caption_targets`). Returns the targets of the image-to-text direction and of the
    text-to-image direction (from the transposed logits and hard targets).
    """
    batch = logits.shape[0]
    hard = torch.eye(batch, device=logits.device) if hard is None else hard.float()
    chosen = (torch.rand(batch, generator=generator) < rho).to(logits.device)[:, None]
    own = logits.detach().float()
    image_to_text = torch.where(chosen, (1 - alpha) * hard + alpha * own.softmax(-1), hard)
    text_to_image = torch.where(chosen, (1 - alpha) * hard.T + alpha * own.T.softmax(-1), hard.T)
    return image_to_text, text_to_image


def psd_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    alpha: float,
    rho: float,
    generator: torch.Generator | None = None,
    caption_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """CLIP's symmetric contrastive loss against PSD's soft targets (`psd_targets`, a
    reconstruction), the hard part from `caption_ids` when given (`caption_targets`). With
    alpha = 0 (or rho = 0) it is exactly `caption_contrastive_loss` (CLIP's InfoNCE when the
    captions differ). Embeddings are unit norm; logits = exp(logit_scale) * cos."""
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.T
    hard = caption_targets(caption_ids) if caption_ids is not None else None
    return soft_contrastive_loss(logits, *psd_targets(logits, alpha, rho, generator, hard))
