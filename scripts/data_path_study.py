"""The data path per core, and the CPU cores a GPU needs: docs/results/data-path.json.

Runs `pipeline.datapath.measure` (the data path alone, no model, one thread; what `bench` reports)
on ImageNet-sized JPEGs it makes, full size and pre-sized to each `--max-sides` (as `shards
--max-side` stores them), and turns distill's images/s per core into the cores one GPU needs at
published training rates. The rates are NVIDIA's DeepLearningExamples figures for ResNet-50 v1.5
in PyTorch with mixed precision (their README, "Training performance results": 1 x V100 16GB 1,200
img/s, 1 x A100 80GB 2,470 img/s), a lower bound for a ResNet-18 student, which needs 2.3x fewer
FLOPs per image: measure yours with `bench` on the GPU.

    python scripts/data_path_study.py            # measure here, write the study, re-render the pages
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import ablation  # noqa: E402  (machine(), code_version())
import results  # noqa: E402

from pipeline import datapath  # noqa: E402

STUDY = ROOT / "docs/results/data-path.json"
# Published single-GPU training rates (images/s), ResNet-50 v1.5, PyTorch, mixed precision:
# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md.
GPU_RATES = {"V100": 1200, "A100": 2470}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="the views' resolution")
    parser.add_argument("--views", type=int, default=10, help="precompute's views per image")
    parser.add_argument("--max-sides", type=int, nargs="*", default=[512, 320, 256])
    args = parser.parse_args()
    import torch

    records = []
    full_decode = None
    for side in [0, *args.max_sides]:
        m = datapath.measure(args.images, args.size, args.size, args.views, 64, side, repeats=3)
        ms = m["ms_per_image"]
        full_decode = full_decode or ms["decode"]
        per_core = m["distill_images_per_second_per_core"]
        figures = {"jpeg_kb": round(m["jpeg_bytes"] / 1000, 1), "read_ms": round(ms["read"], 3),
                   "decode_ms": round(ms["decode"], 3), "view_ms": round(ms["student_view"], 3),
                   "collate_ms": round(ms["collate_student"], 4), "main_process_ms": round(ms["main_process"], 3),
                   "distill_per_core": round(per_core), "precompute_per_core":
                       round(m["precompute_images_per_second_per_core"]),
                   "decode_speedup": round(full_decode / ms["decode"], 2),
                   "device_decode_host_ms": round(m["device_decode_host_ms"], 4),
                   "host_ratio_device_decode": round(m["host_cpu_ratio_device_decode"], 1),
                   **{f"cores_{gpu}": round(datapath.cores_per_gpu(rate, per_core), 1)
                      for gpu, rate in GPU_RATES.items()}}
        label = "full size (500 x 375)" if not side else f"pre-sized, max side {side} ({m['decoded_size'][1]} x " \
                                                         f"{m['decoded_size'][0]})"
        records.append({"label": label, "params": {"shards.max_side": side, "bench.data_path_size": args.size,
                                                   "precompute.views": args.views},
                        "figures": figures, "machine": ablation.machine(torch.device("cpu")),
                        "commit": ablation.code_version(), "measured": date.today().isoformat(),
                        "source": "scripts/data_path_study.py"})
    study = {
        "study": "data-path",
        "title": "The data path per core, and the CPU cores one GPU needs",
        "description": f"`python scripts/data_path_study.py`: the data path alone (`pipeline.datapath`, what `bench` "
                       f"reports; no model, one thread) on {args.images} ImageNet-sized JPEGs it makes (500 x 375, "
                       f"quality 90, photo-like texture), full size and pre-sized as `shards --max-side` stores them "
                       f"(Lanczos, quality 90). Distill's path per image: read from a tar shard, decode, one "
                       f"{args.size} px view, collate; precompute's: the same with {args.views} views. Cores per GPU: "
                       f"the GPU's training rate over distill's images/s per core, at NVIDIA's published ResNet-50 "
                       f"v1.5 mixed-precision rates (DeepLearningExamples, PyTorch resnet50v1.5 README: 1 x V100 "
                       f"1,200 img/s, 1 x A100 2,470 img/s; a ResNet-18 student trains faster, so these are lower "
                       f"bounds on the cores).",
        "columns": [{"header": "JPEGs", "field": "label"}, {"header": "KB", "figure": "jpeg_kb"},
                    {"header": "decode ms", "figure": "decode_ms"},
                    {"header": "distill img/s per core", "figure": "distill_per_core"},
                    {"header": "precompute img/s per core", "figure": "precompute_per_core"},
                    {"header": "decode speed-up", "figure": "decode_speedup"},
                    {"header": "cores per V100", "figure": "cores_V100"},
                    {"header": "cores per A100", "figure": "cores_A100"},
                    {"header": "host CPU saved by --decode device", "figure": "host_ratio_device_decode"}],
        "units": {"jpeg_kb": "kB per JPEG (mean)", "read_ms": "ms per image, one thread",
                  "decode_ms": "ms per image, one thread", "view_ms": "ms per image (one view), one thread",
                  "collate_ms": "ms per image, one thread", "distill_per_core": "images/s on one core",
                  "precompute_per_core": "images/s on one core",
                  "decode_speedup": "full-size decode ms / this decode ms",
                  "cores_V100": "CPU cores per GPU at 1,200 img/s (published ResNet-50 AMP rate)",
                  "cores_A100": "CPU cores per GPU at 2,470 img/s (published ResNet-50 AMP rate)",
                  "main_process_ms": "CPU ms per image of the main process when a DataLoader worker does the rest",
                  "device_decode_host_ms": "ms per image the host's worker spends with --decode device (read the "
                                           "bytes, send them; nvjpeg's launch on the host not measured: no GPU here)",
                  "host_ratio_device_decode": "distill's host ms per image with --decode cpu / with --decode device"},
        "records": records,
        "notes": ["A pre-sized JPEG decodes faster roughly with its pixel count, and more: the resize smooths the "
                  "fine texture that costs entropy decoding. A longer side of 512 is larger than ImageNet's typical "
                  "image, which it leaves as it is: that row decodes the very same files as the full-size row, so "
                  "the difference between the two rows is how much this shared 2-core machine's timings "
                  "move between measurements taken a few seconds apart.",
                  "The demo world renders 64 px images, so pre-sizing has nothing to do there (`--max-side` is the "
                  "folder source's option): its effect on accuracy is not measured here; it is the trade FFCV's "
                  "`max_resolution` makes for ImageNet."],
    }
    STUDY.write_text(results.dump_study(study))
    results.write_all(ROOT)
    print(json.dumps({r["label"]: r["figures"] for r in records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
