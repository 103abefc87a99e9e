"""Decoding on the training device (`--decode device`): the DataLoader workers only read each
sample's JPEG bytes and its view parameters; the process that trains decodes a batch at once on
its device and cuts the views there.

On a GPU, `torchvision.io.decode_jpeg` takes the batch's list of encoded tensors and decodes them
together with nvjpeg: the one call of this path that only a GPU runs. On the CPU the same code
decodes them one by one with libjpeg-turbo, the decoder the workers use (`decode_rgb`), and
`apply_view` cuts the same views: the pixels are those of `--decode cpu`, bit for bit (tested),
so the option moves work between processors without changing a result there. A sample the
batched call cannot decode falls back to the workers' path for that sample alone (libjpeg-turbo,
then PIL); one nothing can decode is dropped from the batch and reported as corrupt, as the
workers drop it with `--decode cpu`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.shards import decode_rgb
from pipeline.views import apply_view

log = logging.getLogger(__name__)

BYTES = "jpeg_bytes"  # a batch's list of encoded samples (uint8 tensors), as the workers send them
VIEWS = {"view": "pixels", "view_pair": "pixels_pair"}  # view parameters -> the views cut from them


def encoded(data: bytes) -> torch.Tensor:
    """A sample's encoded bytes as the uint8 tensor the workers send."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_all(samples: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Every sample decoded to (3, H, W) uint8 RGB on `device` (None where nothing can decode it)."""
    try:
        return list(decode_jpeg(samples, mode=ImageReadMode.RGB, device=device))  # nvjpeg, batched, on a GPU
    except RuntimeError:
        pass  # one of them is not a JPEG libjpeg/nvjpeg reads: each on its own
    images: list[torch.Tensor | None] = []
    for data in samples:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:  # the workers' decoder: libjpeg-turbo, then PIL (any format)
                images.append(decode_rgb(bytes(data.numpy())).to(device))
            except Exception as err:  # noqa: BLE001 - any decoder failure makes the sample corrupt
                log.debug("corrupt image: %s", err)
                images.append(None)
    return images


def device_views(batch: dict[str, Any], device: torch.device, size: int,
                 views_from: str | None = None) -> dict[str, Any]:
    """The batch with its views cut on `device`: `pixels` (and `pixels_pair`) from the encoded
    samples and each sample's view parameters (`view`, `view_pair`: one row each), or, with
    `views_from` (precompute's `params`, kept), `views`: every sample's V views. Rows whose image
    cannot be decoded are dropped from every per-sample entry and their keys added to `corrupt`."""
    batch = dict(batch)
    images = decode_all(batch.pop(BYTES), device)
    keep = [i for i, image in enumerate(images) if image is not None]
    for name, pixels in VIEWS.items():
        if name in batch:
            params = batch.pop(name).numpy()
            batch[pixels] = torch.stack([apply_view(images[i], params[i], size) for i in keep]) if keep else \
                torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    if views_from is not None:
        params = batch[views_from].numpy()
        batch["views"] = torch.stack([torch.stack([apply_view(images[i], p, size) for p in params[i]])
                                      for i in keep]) if keep else \
            torch.empty(0, params.shape[1], 3, size, size, dtype=torch.uint8, device=device)
    if len(keep) < len(images):
        dropped = [batch["keys"][i] for i in range(len(images)) if images[i] is None]
        batch["corrupt"] = list(batch.get("corrupt", [])) + dropped
        rows = torch.tensor(keep, dtype=torch.long)
        for name, value in list(batch.items()):
            if isinstance(value, torch.Tensor) and name not in VIEWS.values() and value.ndim and \
                    value.shape[0] == len(images):
                batch[name] = value[rows]
            elif isinstance(value, list) and name not in ("corrupt",) and len(value) == len(images):
                batch[name] = [value[i] for i in keep]
    return batch


def view_row(params: np.ndarray) -> torch.Tensor:
    """A view's parameters as the worker sends them (float32, VIEW_FIELDS)."""
    return torch.from_numpy(np.asarray(params, dtype=np.float32).copy())
