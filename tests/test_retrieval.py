"""Retrieval recall@K (pipeline/retrieval.py) on hand-made embeddings whose ranks are known."""

import torch

from pipeline.retrieval import distinct, recall_at_k


def test_distinct_captions_keep_first_seen_order():
    texts, of_image = distinct(["a", "b", "a", "c", "b"])
    assert texts == ["a", "b", "c"]
    assert of_image.tolist() == [0, 1, 0, 2, 1]


def test_recall_counts_hits_by_hand():
    # 4 texts on the unit axes; 5 images, each a blend whose ranking over the texts is known
    texts = torch.eye(4)
    images = torch.tensor([
        [1.0, 0.5, 0.0, 0.0],  # own text 0: rank 0
        [0.9, 1.0, 0.0, 0.0],  # own text 0: rank 1 (text 1 scores higher)
        [0.0, 0.0, 1.0, 0.2],  # own text 2: rank 0
        [0.0, 0.0, 1.0, 0.8],  # own text 3: rank 1
        [0.0, 0.9, 0.0, 1.0],  # own text 1: rank 1 (text 3 higher)
    ])
    own = torch.tensor([0, 0, 2, 3, 1])
    result = recall_at_k(images, texts, own, ks=(1, 2))
    assert result["image_to_text_r1"] == 2 / 5
    assert result["image_to_text_r2"] == 5 / 5
    # text -> image, images normalised: text 0 scores images 0 (0.894), 1 (0.669): best positive is
    # image 0, top -> hit@1. text 1: its only image 4 scores 0.669; image 1 scores 0.743 -> rank 1.
    # text 2: image 2 (0.981) top -> hit. text 3: image 3 scores 0.625; image 4 0.743 -> rank 1.
    assert result["text_to_image_r1"] == 2 / 4
    assert result["text_to_image_r2"] == 4 / 4


def test_k_beyond_the_candidates_is_every_hit_and_shared_captions_count_once():
    images = torch.randn(6, 8)
    texts = torch.randn(2, 8)
    own = torch.tensor([0, 1, 0, 1, 0, 1])
    result = recall_at_k(images, texts, own, ks=(5,))
    assert result["image_to_text_r5"] == 1.0  # 2 texts: any k >= 2 finds the own one
    assert result["text_to_image_r5"] == 1.0  # 3 images per text: one is always in the top 5 of 6


def test_equals_clip_benchmarks_recall_on_captions_that_repeat():
    """The reference: CLIP_benchmark's own recall_at_k (its retrieval scores 'any positive in the
    top k'), with one text per distinct caption and every image of that caption a positive."""
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as clip_benchmark_recall

    generator = torch.Generator().manual_seed(0)
    captions = [f"caption {int(i)}" for i in torch.randint(0, 40, (120,), generator=generator)]
    texts, own = distinct(captions)
    images = torch.randn(120, 16, generator=generator)
    text_embeddings = torch.randn(len(texts), 16, generator=generator)
    ours = recall_at_k(images, text_embeddings, own, ks=(1, 5))
    scores = (torch.nn.functional.normalize(text_embeddings, dim=-1)
              @ torch.nn.functional.normalize(images, dim=-1).T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[own, torch.arange(120)] = True
    for k in (1, 5):
        text_to_image = (clip_benchmark_recall(scores, positive, k) > 0).float().mean().item()
        image_to_text = (clip_benchmark_recall(scores.T, positive.T, k) > 0).float().mean().item()
        assert abs(ours[f"text_to_image_r{k}"] - text_to_image) < 1e-6
        assert abs(ours[f"image_to_text_r{k}"] - image_to_text) < 1e-6
        assert 0 < ours[f"text_to_image_r{k}"] < 1
