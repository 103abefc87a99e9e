"""Image-text retrieval recall@K on a split's captions, the way CLIP papers report it.

Captions repeat in a synthetic world (and on web data): images that share a caption string
share one text. Retrieval is over the distinct captions: image -> text is a hit at K when the
image's own caption is among the K texts most similar to it; text -> image is a hit at K when
any image with that caption is among the K images most similar to the text (as CLIP_benchmark
scores a text with several images). Recall is the share of hits over images (image -> text)
or over distinct captions (text -> image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROWS = 2048  # similarity rows computed at a time


def distinct(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions in first-seen order, and the index of each image's caption in them."""
    index: dict[str, int] = {}
    of_image = [index.setdefault(caption, len(index)) for caption in captions]
    return list(index), torch.tensor(of_image, dtype=torch.long)


def recall_at_k(images: torch.Tensor, texts: torch.Tensor, text_of_image: torch.Tensor,
                ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`image_to_text_r{k}` and `text_to_image_r{k}` for each k, as fractions.

    `images` (N, D) and `texts` (T, D) are embeddings in one space (normalised here);
    `text_of_image` (N,) the index of each image's caption among the texts.
    """
    images = torch.nn.functional.normalize(images.float(), dim=-1)
    texts = torch.nn.functional.normalize(texts.float(), dim=-1)
    n, t = images.shape[0], texts.shape[0]
    text_of_image = text_of_image.long()
    result: dict[str, float] = {}
    # image -> text: the rank of the own caption = texts scoring strictly higher
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, ROWS):
        scores = images[start:start + ROWS] @ texts.T
        own = scores.gather(1, text_of_image[start:start + ROWS, None])
        ranks[start:start + ROWS] = (scores > own).sum(dim=1)
    for k in ks:
        result[f"image_to_text_r{k}"] = int((ranks < min(k, t)).sum()) / n
    # text -> image: the best rank over the text's images
    best = torch.full((t,), n, dtype=torch.long)
    for start in range(0, t, ROWS):
        scores = texts[start:start + ROWS] @ images.T  # (rows, N)
        rows = torch.arange(start, min(start + ROWS, t))
        positive = text_of_image[None, :] == rows[:, None]
        top = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
        best[start:start + ROWS] = (scores > top[:, None]).sum(dim=1)
    for k in ks:
        result[f"text_to_image_r{k}"] = int((best < min(k, n)).sum()) / t
    return result
