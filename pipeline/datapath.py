"""The data path alone, per CPU core: what reading, decoding, cutting views and collating cost
per image, without any model (`bench` reports it; `plan` turns it into cores per GPU).

At ImageNet scale the cached pipeline's cost moves from the teacher to JPEG decoding: distill
decodes every image again in every epoch. This measures the project's own functions on
ImageNet-sized JPEGs it makes itself (500 x 375 at quality 90, ImageNet's typical size and
encoder setting; textured, not flat, so that they cost what photos cost to decode), in one
thread, one image at a time, as one DataLoader worker runs them:

- read: the samples' bytes out of a webdataset tar shard (`pipeline.shards.iter_raw`);
- decode: `pipeline.shards.decode_rgb` (libjpeg-turbo through torchvision);
- view: `pipeline.views.apply_view` at the given resolution, once per view;
- collate: stacking a batch of views into one tensor;
- encoded: what a worker does instead with `--decode device` (the bytes as a tensor; the
  training device decodes them, `pipeline.decoding`).

Two readers: precompute's (decode once, `views` views at the teacher's resolution) and distill's
(decode, one view at the student's). And what the main process spends per image when the
workers do all of that: the CPU time of the process that only takes ready batches from a
DataLoader's worker (unpickling them from shared memory).
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import decoding
from pipeline.shards import ShardBatches, ShardRecord, ShardWriterState, decode_rgb, iter_raw, make_loader
from pipeline.views import apply_view, sample_view_params

IMAGENET_SIZE = (500, 375)  # width, height: ImageNet's most common size
IMAGENET_QUALITY = 90


def imagenet_like_jpeg(index: int, size: tuple[int, int] = IMAGENET_SIZE, quality: int = IMAGENET_QUALITY,
                       max_side: int = 0) -> bytes:
    """A photo-like JPEG: smooth colour fields, edges and fine grain (deterministic in `index`).

    With `max_side`, the image is first resized (Lanczos) so its longer side is at most that, as
    `shards --max-side` stores it.
    """
    rng = np.random.default_rng([index, 31])
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.zeros((height, width, 3), np.float32)
    for _ in range(6):  # smooth colour waves at several scales
        fx, fy, phase = rng.uniform(0.002, 0.05), rng.uniform(0.002, 0.05), rng.uniform(0, 6.3)
        pixels += rng.uniform(10, 40, size=3) * np.sin(fx * xx + fy * yy + phase)[..., None]
    for _ in range(12):  # objects: sharp-edged discs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 90)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        pixels[disc] = rng.uniform(-80, 80, size=3)
    pixels += rng.normal(0, 12, size=pixels.shape)  # sensor grain: what makes photos cost to decode
    image = Image.fromarray(np.clip(pixels + 128, 0, 255).astype(np.uint8))
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                             Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shard(directory: Path, jpegs: list[bytes]) -> Path:
    writer = ShardWriterState(directory, "train", len(jpegs))
    for i, jpeg in enumerate(jpegs):
        writer.write(ShardRecord(f"img{i:06d}", jpeg, i % 1000))
    return directory / writer.close()[0]["name"]


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def measure(images: int = 64, image_size: int = 224, teacher_size: int = 224, views: int = 10,
            batch_size: int = 64, max_side: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Milliseconds per image of each part, in one thread, and images/s per core of each reader.

    `images` JPEGs are made (with `max_side`: pre-sized), written to a shard in a temporary
    folder, and each part timed over all of them, `repeats` times (the fastest pass counts: the
    machine's noise only ever adds time).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jpegs = [imagenet_like_jpeg(i, max_side=max_side) for i in range(images)]
        decoded = [decode_rgb(jpeg) for jpeg in jpegs]
        params = [sample_view_params(np.random.default_rng(i), views, img.shape[2], img.shape[1],
                                     (0.08, 1.0), (3 / 4, 4 / 3), True) for i, img in enumerate(decoded)]
        with tempfile.TemporaryDirectory(prefix="csm-datapath-") as tmp:
            shard = write_shard(Path(tmp), jpegs)

            def read() -> None:
                for _ in iter_raw(shard):
                    pass

            def best(fn: Callable[[], Any]) -> float:
                return min(seconds_per_call(fn, 1) for _ in range(repeats)) / images * 1000

            read_ms = best(read)
            main_ms = main_process_ms(shard, image_size, batch_size, repeats)
        decode_ms = best(lambda: [decode_rgb(jpeg) for jpeg in jpegs])
        encoded_ms = best(lambda: [decoding.encoded(jpeg) for jpeg in jpegs])  # `--decode device`'s worker
        student_view_ms = best(lambda: [apply_view(img, p[0], image_size) for img, p in zip(decoded, params,
                                                                                             strict=True)])
        teacher_views_ms = best(lambda: [[apply_view(img, v, teacher_size) for v in p]
                                         for img, p in zip(decoded, params, strict=True)])
        student_views = [apply_view(img, p[0], image_size) for img, p in zip(decoded, params, strict=True)]
        teacher_views = [apply_view(img, p[0], teacher_size) for img, p in zip(decoded, params, strict=True)]

        def collate(batch_views: list[torch.Tensor], per_image: int) -> Callable[[], None]:
            def run() -> None:
                for start in range(0, len(batch_views), batch_size):
                    torch.stack(batch_views[start:start + batch_size] * per_image)
            return run

        collate_student_ms = best(collate(student_views, 1))
        collate_teacher_ms = best(collate(teacher_views, views))
    finally:
        torch.set_num_threads(threads)
    distill_ms = read_ms + decode_ms + student_view_ms + collate_student_ms
    precompute_ms = read_ms + decode_ms + teacher_views_ms + collate_teacher_ms
    return {
        "images": images, "jpeg_size": list(IMAGENET_SIZE), "jpeg_quality": IMAGENET_QUALITY, "max_side": max_side,
        "decoded_size": list(decoded[0].shape[1:]), "jpeg_bytes": round(sum(map(len, jpegs)) / images),
        "image_size": image_size, "teacher_size": teacher_size, "views": views, "batch_size": batch_size,
        "ms_per_image": {"read": read_ms, "decode": decode_ms, "encoded": encoded_ms, "student_view": student_view_ms,
                         "teacher_views": teacher_views_ms, "collate_student": collate_student_ms,
                         "collate_teacher": collate_teacher_ms, "main_process": main_ms},
        "distill_images_per_second_per_core": 1000 / distill_ms,
        "precompute_images_per_second_per_core": 1000 / precompute_ms,
        "decode_share_distill": decode_ms / distill_ms,
        # `--decode device` on a GPU: the host reads the bytes and sends them; nvjpeg decodes and the
        # GPU cuts the view (its launch cost on the host is not measured here: no GPU)
        "device_decode_host_ms": read_ms + encoded_ms,
        "host_cpu_ratio_device_decode": distill_ms / (read_ms + encoded_ms),
    }


def main_process_ms(shard: Path, image_size: int, batch_size: int, repeats: int) -> float:
    """CPU milliseconds the main process spends per image taking ready batches of uint8 views
    (`image_size`) from one DataLoader worker that reads, decodes and cuts them."""
    def prepare(sample, _):
        return {"pixels": apply_view(sample.image, np.array([0, 0, 1, 1, 0], np.float32), image_size)}

    loader = make_loader(ShardBatches([shard], batch_size, prepare), 1, prefetch=4, persistent=True)
    fastest = float("inf")
    for _ in range(repeats):
        images, started = 0, time.process_time()
        for batch in loader:
            images += len(batch["keys"])
        fastest = min(fastest, (time.process_time() - started) / max(images, 1) * 1000)
    return fastest


def cores_per_gpu(gpu_images_per_second: float, images_per_second_per_core: float) -> float:
    """CPU cores a data path needs to feed one GPU at a rate (images/s), at a measured rate per core."""
    return gpu_images_per_second / images_per_second_per_core
