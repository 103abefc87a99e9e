"""Views: sampled parameters are reproducible and valid; apply_view replays them exactly;
eval_view is open_clip's evaluation preprocessing."""

from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.views import (
    CENTER_VIEW,
    apply_view,
    crop_box,
    eval_view,
    normalize_pixels,
    sample_view_params,
    view_rng,
)


def test_same_seed_same_parameters_and_they_vary():
    a = sample_view_params(view_rng(0, 2, 5), 8, 64, 48, (0.35, 1.0), (0.75, 4 / 3), True)
    b = sample_view_params(view_rng(0, 2, 5), 8, 64, 48, (0.35, 1.0), (0.75, 4 / 3), True)
    c = sample_view_params(view_rng(1, 2, 5), 8, 64, 48, (0.35, 1.0), (0.75, 4 / 3), True)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (8, 5) and a.dtype == np.float32
    assert len(np.unique(a[:, :4], axis=0)) == 8


def test_parameters_stay_inside_the_image_and_respect_the_ranges():
    rng = np.random.default_rng(0)
    params = sample_view_params(rng, 2000, 64, 64, (0.35, 1.0), (0.75, 4 / 3), True)
    x0, y0, w, h, flip = params.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.35 - 0.03 and area.max() <= 1.0
    assert set(np.unique(flip)) == {0.0, 1.0}
    no_flip = sample_view_params(rng, 50, 64, 64, (0.35, 1.0), (0.75, 4 / 3), False)
    assert (no_flip[:, 4] == 0).all()


def test_apply_view_crops_resizes_and_flips_exactly():
    image = torch.arange(3 * 40 * 60, dtype=torch.int64).reshape(3, 40, 60).remainder(251).to(torch.uint8)
    params = np.array([0.25, 0.5, 0.5, 0.25, 1.0], dtype=np.float32)
    assert crop_box(params, 60, 40) == (15, 20, 30, 10)
    view = apply_view(image, params, 16)
    crop = image[:, 20:30, 15:45]
    expected = F.interpolate(crop[None], size=(16, 16), mode="bilinear", align_corners=False, antialias=True)[0]
    assert view.dtype == torch.uint8 and torch.equal(view, expected.flip(-1))


def test_centre_view_is_the_whole_image_resized():
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert torch.equal(apply_view(image, CENTER_VIEW, 64), image)
    assert apply_view(image, CENTER_VIEW, 32).shape == (3, 32, 32)


def test_normalize_pixels_scales_uint8_and_takes_floats_as_unit_range():
    zero, one = torch.zeros(1), torch.ones(1)
    pixels = torch.tensor([0, 255], dtype=torch.uint8)
    assert torch.equal(normalize_pixels(pixels, zero, one), torch.tensor([0.0, 1.0]))
    assert torch.equal(normalize_pixels(torch.tensor([0.5]), zero, one), torch.tensor([0.5]))
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    assert torch.allclose(normalize_pixels(pixels, mean, std), torch.tensor([-2.0, 2.0]))
    floats = torch.tensor([0.5])
    normalize_pixels(floats, mean, std)
    assert torch.equal(floats, torch.tensor([0.5]))  # the input is never modified
    batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert normalize_pixels(batch, zero, one).is_contiguous(memory_format=torch.channels_last)


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth stripes plus noise, so resampling differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([127 + 120 * np.sin(xx / 7 + c) * np.cos(yy / 11) for c in range(3)], axis=-1)
    return np.clip(smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def test_eval_view_is_open_clips_eval_preprocessing_on_non_square_images():
    """Shorter side resized (bicubic), centre crop: open_clip's `preprocess` at the teacher's
    resolution (224) and the same geometry at a student's (64), landscape and portrait."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    for height, width in ((300, 451), (500, 333)):
        pixels = textured_image(height, width)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        for size in (224, 64):
            preprocess = open_clip.image_transform(size, is_train=False)  # what create_model_and_transforms gives
            expected = preprocess(Image.fromarray(pixels))
            ours = normalize_pixels(eval_view(image, size)[None], mean, std)[0]  # the teacher's own input step
            assert ours.shape == expected.shape == (3, size, size)
            assert ((ours - expected).abs() * std[0]).max().item() <= 1 / 255 + 1e-6, (height, width, size)
            # Squashing the whole image (the former evaluation view) is not that.
            squashed = normalize_pixels(apply_view(image, CENTER_VIEW, size)[None], mean, std)[0]
            assert ((squashed - expected).abs() * std[0]).max().item() > 20 / 255


def test_eval_view_keeps_an_image_already_at_size():
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert torch.equal(eval_view(image, 64), image)
