"""Reproducible augmented views: sample parameters once, replay them anywhere.

A view is a random resized crop plus an optional horizontal flip, described by
`VIEW_FIELDS`: the crop box as fractions of the original image (x0, y0, width, height) and
the flip flag. Stage one samples V parameter sets per image and stores them; stage two
replays them with the same `apply_view`, at the student's resolution, so teacher and
student see the same region of the same image. Evaluation (probe features, zero-shot) uses
`eval_view` instead: CLIP's own evaluation preprocessing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

VIEW_FIELDS = ("x0", "y0", "width", "height", "flip")
CENTER_VIEW = np.array([0.0, 0.0, 1.0, 1.0, 0.0], dtype=np.float32)


def view_rng(seed: int, shard: int, position: int) -> np.random.Generator:
    """The generator of one image's views: a function of the seed and where the image is."""
    return np.random.default_rng([seed, shard, position])


def sample_view_params(
    rng: np.random.Generator,
    count: int,
    image_width: int,
    image_height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
) -> np.ndarray:
    """(count, 5) float32 view parameters, as torchvision's RandomResizedCrop samples them.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); up to 10 tries to fit inside
    the image, then the largest centred crop within the ratio range.
    """
    views = np.empty((count, len(VIEW_FIELDS)), dtype=np.float32)
    area = image_width * image_height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for v in range(count):
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= image_width and 0 < h <= image_height:
                x0 = int(rng.integers(0, image_width - w + 1))
                y0 = int(rng.integers(0, image_height - h + 1))
                break
        else:
            in_ratio = image_width / image_height
            if in_ratio < ratio[0]:
                w, h = image_width, round(image_width / ratio[0])
            elif in_ratio > ratio[1]:
                w, h = round(image_height * ratio[1]), image_height
            else:
                w, h = image_width, image_height
            x0, y0 = (image_width - w) // 2, (image_height - h) // 2
        flipped = float(rng.random() < 0.5) if flip else 0.0
        views[v] = (x0 / image_width, y0 / image_height, w / image_width, h / image_height,
                    flipped)
    return views


def crop_box(params: np.ndarray | torch.Tensor, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, width, height) of fractional view parameters on an image."""
    x0, y0, w, h = (float(v) for v in params[:4])
    left = min(round(x0 * width), width - 1)
    top = min(round(y0 * height), height - 1)
    box_w = max(1, min(round(w * width), width - left))
    box_h = max(1, min(round(h * height), height - top))
    return left, top, box_w, box_h


def apply_view(image: torch.Tensor, params: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """The view of a (3, H, W) uint8 image: crop, resize to (size, size), flip.

    Returns a (3, size, size) uint8 image (bilinear, antialiased). The single definition both
    stages use; models take uint8 views and normalise them themselves (`normalize_pixels`),
    which keeps DataLoader transfers at one byte per value.
    """
    _, height, width = image.shape
    left, top, box_w, box_h = crop_box(params, width, height)
    view = image[:, top:top + box_h, left:left + box_w]
    if view.shape[1:] != (size, size):
        view = F.interpolate(view[None], size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    if float(params[4]) >= 0.5:
        view = view.flip(-1)
    return view.contiguous()


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of a (3, H, W) uint8 image: (3, size, size) uint8.

    The shorter side resized to `size` (bicubic), then the central size x size crop: OpenAI's
    and open_clip's eval transform (torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a
    PIL image), so teacher numbers are comparable with published ones; the student gets the
    same geometry at its own resolution. Squashing a non-square image would distort it. The
    same torchvision functions on the same PIL kernels give open_clip's pixels exactly; the
    tensor kernels differ by up to 2/255 at a few pixels, and cost as much here.
    """
    if image.shape[1:] == (size, size):
        return image
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    picture = TF.center_crop(TF.resize(picture, size, interpolation=InterpolationMode.BICUBIC), size)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()


def normalize_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std as float32, x = uint8 views / 255 or float input already in [0, 1].

    The model-side input step of teacher and student (mean, std broadcastable, e.g. (1, 3, 1, 1)):
    one scale and one shift on a fresh copy, two passes over the pixels instead of four. The
    memory format (channels_last) of the input is kept.
    """
    scale = 1.0 / (255.0 * std) if pixels.dtype == torch.uint8 else 1.0 / std
    return pixels.to(torch.float32, copy=True).mul_(scale).sub_(mean / std)


PRECOMPUTE_PREFETCH = 2  # batches each precompute DataLoader worker keeps ready


def precompute_images_per_batch(batch_size: int, views: int) -> int:
    """Images per teacher forward in precompute: --batch-size counts views, --views per image."""
    return max(1, batch_size // views)


def precompute_batch_bytes(images: int, views: int, size: int) -> int:
    """Bytes of one precompute batch as a DataLoader worker ships it through shared memory
    (stages.precompute's `ViewRenderer` and `collate`): per image, V uint8 views of 3 x S x S and
    their float32 view parameters, and an int64 position and label. Keys and captions travel
    pickled: a few bytes, left out."""
    return images * (views * (3 * size * size + 4 * len(VIEW_FIELDS)) + 2 * 8)
