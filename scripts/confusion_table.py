"""The most-confused class pairs of a probe run as a results study (docs/results/<study>.json).

probe writes each zero-shot classifier's confusion summary to `<plots>/confusion.json`, and
demo-teacher its CPA classifier's to its metrics file (`zero_shot_confusion_cpa`; both
`pipeline/confusion.py`). This script turns the most-confused (true, predicted) pairs, of the
teacher and the student, into a study file whose page scripts/results.py renders:

    python scripts/confusion_table.py data/ablation/<row>/confusion.json --json docs/results/NAME.json
    python scripts/confusion_table.py data/teachers/hard-msclip.metrics.json --json docs/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

import results  # scripts/results.py (run as a script, its folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def records(summary: dict[str, Any], source: str, pairs: int) -> list[dict[str, Any]]:
    rows = []
    for model in ("teacher", "student"):
        found = summary["models"].get(model)
        if found is None:
            continue
        for rank, pair in enumerate(found["pairs"][:pairs], 1):
            params = {"pair.model": model, "pair.rank": rank, "pair.true": pair["true"],
                      "pair.predicted": pair["predicted"]}
            if "related" in pair:
                params["pair.related"] = "yes" if pair["related"] else "no"
            rows.append({"label": f"{model} {rank}", "params": params,
                         "figures": {"count": pair["count"], "share_of_true": round(100 * pair["share_of_true"], 2),
                                     "model_errors": found["errors"]},
                         "source": source, "measured": date.fromtimestamp(Path(source).stat().st_mtime).isoformat()})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("confusion", type=Path, help="a probe's confusion.json")
    parser.add_argument("--json", type=Path, required=True, help="the study file to write")
    parser.add_argument("--title", default="The most-confused class pairs")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per model")
    args = parser.parse_args(argv)
    summary = json.loads(args.confusion.read_text())
    if "zero_shot_confusion_cpa" in summary:  # a demo teacher's metrics
        teacher = summary["zero_shot_confusion_cpa"]
        summary = {"related": "twin classes of the hard demo world" if "related_share" in teacher else None,
                   "models": {"teacher": teacher}}
    related = summary.get("related")
    study = {
        "study": args.json.stem,
        "title": args.title,
        "description": f"`python scripts/confusion_table.py {args.confusion} --json {args.json}`: the most frequent "
                       "zero-shot errors on the val split (true class, predicted class) of the teacher and the "
                       "student, from probe's confusion summary (pipeline/confusion.py)"
                       + (f"; related: {related}." if related else "."),
        "columns": [{"header": "model", "param": "pair.model"}, {"header": "true class", "param": "pair.true"},
                    {"header": "predicted", "param": "pair.predicted"},
                    *([{"header": "related", "param": "pair.related"}] if related else []),
                    {"header": "images", "figure": "count"},
                    {"header": "% of the true class", "figure": "share_of_true"},
                    {"header": "of the model's errors", "figure": "model_errors"}],
        "units": {"count": "val images of the true class predicted as the other",
                  "share_of_true": "% of the true class's val images",
                  "model_errors": "the model's zero-shot errors on val, all classes"},
        "records": records(summary, str(args.confusion), args.pairs),
    }
    results.write_text(args.json, results.dump_study(study))
    results.write_all(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
