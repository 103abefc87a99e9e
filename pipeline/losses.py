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


def caption_contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Symmetric CLIP loss where pairs with identical caption text are all positives.

    Row i's target is uniform over the columns j whose caption equals caption i (the same
    string is not a negative of itself); with all-distinct captions this is exactly CLIP's
    InfoNCE. Embeddings are unit norm; logits = exp(logit_scale) * cos.
    """
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(-1, keepdim=True)
    image_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    text_loss = -(targets * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    loss = (image_loss + text_loss) / 2
    return {"loss": loss, "contrastive": loss.detach()}
