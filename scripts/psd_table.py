"""PSD vs CLIP teacher pre-training on noisy captions, summarised over seeds from the study's records.

`docs/results/psd.json` holds one record per teacher (scripts/ablation.py --teacher-only over
params/psd.yaml: two objectives x two seeds, at two caption-noise rates on an endless stream of
fresh images and at one on a finite set cycled for many epochs; each teacher measured alone);
this script writes the table issue 30 asks for as the study `docs/results/psd-table.json` (its
page rendered by scripts/results.py): per training set and noise rate, CLIP and PSD as the mean
of their seeds with the range the seeds span, and PSD - CLIP as the mean of the per-seed
differences (the same seed: the same initialisation, captions and noise draws), with the number
of (seed, measure) pairs in which PSD is ahead.

    python scripts/psd_table.py            # write the table study and re-render the pages
    python scripts/psd_table.py --check    # exit 1 when the committed table is not what the records give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import results  # noqa: E402  (scripts/results.py)

RECORDS = ROOT / "docs/results/psd.json"
TABLE = ROOT / "docs/results/psd-table.json"
# the four measures of the claim (zero-shot, linear probe, retrieval, robustness), as the records name them
MEASURES = {"zeroshot": "teacher_zeroshot_top1", "linear": "teacher_linear_top1",
            "image_to_text_r1": "teacher_image_to_text_r1", "text_to_image_r1": "teacher_text_to_image_r1",
            "shifted_zeroshot": "teacher_shifted_zeroshot_top1", "shifted_linear": "teacher_shifted_linear_top1"}

WHAT = {"zeroshot": "% of the val images (top-1), zero-shot with CPA class prompts",
        "linear": "% of the val images (top-1), linear probe", "image_to_text_r1": "% recall@1 on the val captions",
        "text_to_image_r1": "% recall@1 on the val captions",
        "shifted_zeroshot": "% of the shifted split's images (top-1), zero-shot",
        "shifted_linear": "% of the shifted split's images (top-1), linear probe fitted on train"}


Setting = tuple[int, float]  # (train_images, caption_noise); train_images 0: an endless stream


def runs(records: list[dict[str, Any]]) -> dict[tuple[Setting, str], dict[int, dict[str, float]]]:
    """{((train_images, noise), objective): {seed: figures}} from the study's records."""
    found: dict[tuple[Setting, str], dict[int, dict[str, float]]] = {}
    for record in records:
        params = record["params"]
        setting = (params["demo_teacher.train_images"], params["demo_teacher.caption_noise"])
        found.setdefault((setting, params["demo_teacher.objective"]), {})[params["demo_teacher.seed"]] = \
            record["figures"]
    return found


def setting_name(setting: Setting, epochs: float) -> str:
    """'noise 0.3' (an endless stream of fresh images) or 'noise 0.3, 5,120 images x 80 epochs'."""
    images, noise = setting
    return f"noise {noise}" + (f", {images:,} images x {epochs:g} epochs" if images else "")


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = runs(records)
    budget = records[0]["params"] if records else {}
    rows = []
    for setting in sorted({setting for setting, _ in found}):
        clip, psd = found.get((setting, "clip"), {}), found.get((setting, "psd"), {})
        epochs = round(budget["demo_teacher.steps"] * budget["demo_teacher.batch_size"] / setting[0], 1) \
            if setting[0] else 0
        described = setting_name(setting, epochs)
        params = {"demo_teacher.train_images": setting[0], "demo_teacher.caption_noise": setting[1]}
        for objective, seeds in (("clip", clip), ("psd", psd)):
            if not seeds:
                continue
            figures: dict[str, Any] = {}
            for name, key in MEASURES.items():
                values = [seeds[seed][key] for seed in sorted(seeds)]
                figures[name] = mean(values)
                figures[f"{name}_seeds"] = {"min": min(values), "max": max(values)}
            figures["last_interval_gain"] = mean([seeds[seed]["teacher_last_interval_gain"] for seed in seeds])
            figures["peak_zeroshot"] = mean([seeds[seed]["teacher_peak_zeroshot_top1"] for seed in seeds])
            figures["seeds"] = len(seeds)
            rows.append({"label": f"{objective.upper()}, {described}",
                         "params": {**params, "demo_teacher.objective": objective}, "figures": figures})
        paired = sorted(set(clip) & set(psd))
        if paired:
            figures = {}
            for name, key in MEASURES.items():
                differences = [round(psd[seed][key] - clip[seed][key], 4) for seed in paired]
                figures[name] = mean(differences)
                figures[f"{name}_seeds"] = {"min": min(differences), "max": max(differences)}
            figures["seeds"] = len(paired)
            figures["psd_ahead"] = sum(
                sum(psd[seed][key] > clip[seed][key] for seed in paired) for key in MEASURES.values())
            figures["comparisons"] = len(paired) * len(MEASURES)
            rows.append({"label": f"PSD - CLIP, {described}",
                         "params": {**params, "demo_teacher.objective": "psd - clip"}, "figures": figures})
    return rows


def table_study(records_study: dict[str, Any]) -> dict[str, Any]:
    records = records_study["records"]
    budget = records[0]["params"] if records else {}
    return {
        "study": "psd-table",
        "title": "PSD vs CLIP teacher pre-training on noisy captions (hard world), over seeds",
        "description": "Generated by `python scripts/psd_table.py` from [psd](psd.md) (each row there one teacher "
                       "trained from scratch and measured alone). CLIP and PSD rows: the mean of the seeds, the "
                       "range the seeds span in the columns after. PSD - CLIP rows: the mean of the per-seed "
                       "differences (same seed: same initialisation, captions and noise draws), their range, and "
                       "in how many (seed, measure) pairs PSD is ahead. Rows without an image count train on an "
                       "endless stream of freshly rendered images (no pair seen twice); rows with N images on a "
                       "finite set of N images and their fixed captions, cycled with new crops. Budget: "
                       f"{budget.get('demo_teacher.steps', '?')} steps x {budget.get('demo_teacher.batch_size', '?')} "
                       f"captions; PSD's alpha ramps to {budget.get('demo_teacher.psd_alpha_max', '?')} over "
                       f"{budget.get('demo_teacher.psd_ramp', '?')} of the steps (rho "
                       f"{budget.get('demo_teacher.psd_rho', '?')}).",
        "columns": [{"header": "teacher", "field": "label"},
                    {"header": "zero-shot top-1", "figure": "zeroshot"},
                    {"header": "linear top-1", "figure": "linear"},
                    {"header": "image-to-text R@1", "figure": "image_to_text_r1"},
                    {"header": "text-to-image R@1", "figure": "text_to_image_r1"},
                    {"header": "shifted zero-shot", "figure": "shifted_zeroshot"},
                    {"header": "shifted linear", "figure": "shifted_linear"},
                    {"header": "seeds", "figure": "seeds"},
                    {"header": "zero-shot, seeds", "figure": "zeroshot_seeds"},
                    {"header": "linear, seeds", "figure": "linear_seeds"},
                    {"header": "image-to-text R@1, seeds", "figure": "image_to_text_r1_seeds"},
                    {"header": "shifted zero-shot, seeds", "figure": "shifted_zeroshot_seeds"},
                    {"header": "PSD ahead (of pairs)", "figure": "psd_ahead"},
                    {"header": "pairs", "figure": "comparisons"},
                    {"header": "last-interval gain", "figure": "last_interval_gain"},
                    {"header": "peak zero-shot", "figure": "peak_zeroshot"}],
        "units": {**{name: f"{what}, mean over seeds (PSD - CLIP rows: points)" for name, what in WHAT.items()},
                  **{f"{name}_seeds": "the seeds' range (PSD - CLIP: of the per-seed differences)"
                     for name in MEASURES},
                  "seeds": "teachers (seeds) in the row", "psd_ahead": "(seed, measure) pairs where PSD is ahead",
                  "comparisons": "(seed, measure) pairs compared",
                  "last_interval_gain": "points of CPA zero-shot gained over the last evaluation interval, mean",
                  "peak_zeroshot": "% of the val images (top-1), zero-shot (CPA), the best logged evaluation "
                                   "during training or the final one, mean over seeds (above the zero-shot "
                                   "column: training past it made the teacher worse)"},
        "records": table_rows(records),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed table differs")
    args = parser.parse_args()
    return results.derived_study(TABLE, table_study(json.loads(RECORDS.read_text())), str(RECORDS),
                                 "python scripts/psd_table.py", args.check)


if __name__ == "__main__":
    sys.exit(main())
