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


def psd_targets(logits: torch.Tensor, alpha: float, rho: float, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets of progressive self-distillation (PSD), a reconstruction.

    Andonian et al. (CVPR 2022) distil the model's own knowledge into soft image-text
    alignment targets for a subset of every minibatch; their exact formula is not public to
    us. This reconstruction: a random subset of rows (each row with probability `rho`) gets
    (1 - alpha) * identity + alpha * softmax(logits) (the model's own distribution, no
    gradient), the other rows the one-hot identity. Returns the targets (B, B) of the
    image-to-text direction and of the text-to-image direction (from the transposed logits).
    """
    batch = logits.shape[0]
    identity = torch.eye(batch, device=logits.device, dtype=torch.float32)
    chosen = (torch.rand(batch, generator=generator) < rho).to(logits.device)[:, None]
    own = logits.detach().float()
    image_to_text = torch.where(chosen, (1 - alpha) * identity + alpha * own.softmax(-1), identity)
    text_to_image = torch.where(chosen, (1 - alpha) * identity + alpha * own.T.softmax(-1), identity)
    return image_to_text, text_to_image


def psd_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    alpha: float,
    rho: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """CLIP's symmetric contrastive loss against PSD's soft targets (`psd_targets`, a
    reconstruction). With alpha = 0 (or rho = 0) it is exactly CLIP's InfoNCE loss.
    Embeddings are unit norm; logits = exp(logit_scale) * cos."""
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.T
    image_to_text, text_to_image = psd_targets(logits, alpha, rho, generator)
    image_loss = -(image_to_text * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    text_loss = -(text_to_image * F.log_softmax(logits.T, dim=-1)).sum(-1).mean()
    loss = (image_loss + text_loss) / 2
    return {"loss": loss, "contrastive": loss.detach()}
