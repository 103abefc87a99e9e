"""Compute per image and CPU throughput of the models a real run uses, plus the cache size.

Counts FLOPs with torch's FlopCounterMode (2 per multiply-add) for one 224 px image through
the teacher forward (ViT-B-32, ViT-L-14, random weights: speed only) and the student
(ResNet-18 forward, and a training step = forward + backward), measures images/s on this
machine's CPU, and computes the ImageNet cache size from the layout in pipeline/cache.py.
Run: python scripts/compute_cost.py   (prints a markdown table for the README)
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from pipeline.cache import stored_bytes_per_view

IMAGENET_TRAIN_IMAGES = 1_281_167


def flops(fn, *args) -> float:
    # nn.MultiheadAttention's fused inference kernel is invisible to the counter: count the
    # unfused path (same arithmetic).
    torch.backends.mha.set_fastpath_enabled(False)
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    torch.backends.mha.set_fastpath_enabled(True)
    return counter.get_total_flops()


def images_per_second(fn, batch: torch.Tensor, seconds: float) -> float:
    fn(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in ("ViT-B-32", "ViT-L-14"):
        model = open_clip.create_model(name).eval()

        @torch.no_grad()
        def forward(x, model=model):
            return model.encode_image(x)

        x = torch.rand(args.batch, 3, 224, 224)
        rows.append((f"teacher {name} forward", flops(forward, x[:1]), images_per_second(forward, x, args.seconds)))
    student = torchvision.models.resnet18()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)

    @torch.no_grad()
    def student_forward(x):
        return student.eval()(x)

    def student_step(x):
        student.train()
        optimizer.zero_grad()
        student(x).float().pow(2).mean().backward()
        optimizer.step()

    x = torch.rand(args.batch, 3, 224, 224)
    rows.append(("student ResNet-18 forward", flops(student_forward, x[:1]), images_per_second(student_forward, x,
                                                                                               args.seconds)))
    rows.append(("student ResNet-18 training step", flops(student_step, x[:2]) / 2,
                 images_per_second(student_step, x, args.seconds)))
    print(f"threads: {torch.get_num_threads()}, batch {args.batch}, 224 px, CPU")
    print("| model | GFLOPs / image | images/s on this CPU |")
    print("|---|---|---|")
    for label, count, speed in rows:
        print(f"| {label} | {count / 1e9:.2f} | {speed:.1f} |")
    print()
    for views, topk in ((10, 0), (10, 64)):
        per_view = stored_bytes_per_view(1000, views, topk=topk)
        total = per_view * views * IMAGENET_TRAIN_IMAGES
        label = "full fp16" if not topk else f"top-{topk}"
        print(f"ImageNet cache, {views} views, 1000 anchors, {label}: {per_view:.1f} B/view, {total / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
