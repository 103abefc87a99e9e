"""The demo ablation: anchors, loss, top-k targets and views per image at equal training budget.

Every row of `params/ablation.yaml` is `params.yaml` with a few overrides; the row runs
precompute (shared between rows with the same precompute settings), distill and probe (without
the supervised reference) into data/ablation/<row>/, and the script prints a markdown table of
the student's linear and zero-shot top-1 with the cache's bytes per view, and writes
metrics/ablation.json. Rows already done (their probe.json exists) are not run again, so an
interrupted ablation continues where it stopped; a row whose resolved settings changed (its
overrides, params.yaml's defaults, the teacher) runs again.

    python scripts/ablation.py                 # all rows
    python scripts/ablation.py --rows "V = 1"  # some rows

Rows that override `demo_teacher.*` first pre-train their own teacher with the demo-teacher
stage (shared between rows with the same teacher settings, in data/ablation/teachers/) and use
it as the teacher of their cache; `params/teachers.yaml` compares teacher pre-training that way
(CLIP vs PSD, two-tower vs MS-CLIP), and the table then adds the teacher's columns:

    python scripts/ablation.py --rows-file params/teachers.yaml --json metrics/teachers.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path

import yaml

from pipeline.atomic import write_json
from pipeline.cache import TeacherCache, stored_bytes_per_view
from pipeline.config import DEFAULT_PARAMS, load_config, override, to_dict
from pipeline.errors import PipelineError
from pipeline.teacher import teacher_identity
from stages import demo_teacher, distill, precompute, probe

OUT = Path("data/ablation")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def stage_changes(overrides: dict[str, object], stage: str) -> dict[str, object]:
    """The overrides of one stage: 'precompute.views' -> {'views': ...}; shared sections go to all."""
    changes = {}
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        if section == stage:
            changes[rest] = value
        elif section == "prompts" or (section == "teacher" and stage != "demo_teacher"):
            changes[key] = value
        elif section == "train" and stage in ("distill",):
            changes[key] = value
    return changes


def settings_key(overrides: dict[str, object], prefixes: tuple[str, ...]) -> str:
    chosen = {k: v for k, v in overrides.items() if k.startswith(prefixes)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:10]


def row_teacher(overrides: dict[str, object], params: Path) -> dict[str, object]:
    """A row's own pre-trained teacher (when it overrides demo_teacher.*): the teacher.* overrides
    that select it, plus its training metrics under "_metrics"."""
    if not any(k.startswith("demo_teacher.") for k in overrides):
        return {}
    config = override(load_config("demo_teacher", params), stage_changes(overrides, "demo_teacher"))
    # keyed by the model config's content too: an edited config file is another teacher
    content = hashlib.sha256(Path(config.config).read_bytes()).hexdigest()
    key = settings_key({**overrides, "demo_teacher.config_sha256": content}, ("demo_teacher.",))
    out = OUT / "teachers" / f"{key}.safetensors"
    config = override(config, {"out": str(out)})
    metrics_path = out.with_suffix(".metrics.json")
    if not metrics_path.is_file():
        demo_teacher.run(config)
    return {"teacher.model": "", "teacher.pretrained": "", "teacher.config": config.config,
            "teacher.checkpoint": str(out), "_metrics": json.loads(metrics_path.read_text())}


def run_row(name: str, overrides: dict[str, object], params: Path) -> dict[str, object]:
    row_dir = OUT / slug(name)
    result_path = row_dir / "probe.json"
    teacher = row_teacher(overrides, params)
    teacher_metrics = teacher.pop("_metrics", None)
    overrides = {**overrides, **teacher}
    precompute_config = override(load_config("precompute", params), stage_changes(overrides, "precompute"))
    # keyed by the teacher's identity (weights' checksum, architecture), also when it is
    # params.yaml's: a new or retrained teacher gets new caches, never the previous teacher's
    cache_key = settings_key({**overrides, "teacher.identity": teacher_identity(precompute_config.teacher)},
                             ("precompute.", "prompts.", "teacher."))
    cache_path = OUT / "caches" / f"{cache_key}.h5"
    if not cache_path.is_file():
        precompute.run(override(precompute_config, {"out": str(cache_path),
                                                    "metrics": str(cache_path.with_suffix(".json"))}))
    distill_config = override(load_config("distill", params), {
        **stage_changes(overrides, "distill"), "train.cache": str(cache_path),
        "out": str(row_dir / "student.pt"), "run_dir": str(row_dir / "run"),
        "metrics": str(row_dir / "distill.json"), "plot": str(row_dir / "distill.csv")})
    probe_config = override(load_config("probe", params), {
        **stage_changes(overrides, "probe"), "cache": str(cache_path),
        "student": str(row_dir / "student.pt"), "supervised": "", "out": str(result_path),
        "plots": str(row_dir), "distill_csv": str(row_dir / "distill.csv")})
    # A finished row is reused only while its resolved settings (and so its cache) are the same:
    # after a change of params.yaml's defaults the row runs again.
    stamp = json.loads(json.dumps({"distill": to_dict(distill_config), "probe": to_dict(probe_config)}))
    stamp_path = row_dir / "settings.json"
    if not (result_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp):
        result_path.unlink(missing_ok=True)
        distill.run(distill_config)
        probe.run(probe_config)
        write_json(stamp_path, stamp)
    header = TeacherCache(cache_path).header
    metrics = json.loads(result_path.read_text())
    result = {
        "row": name,
        "overrides": {k: v for k, v in overrides.items() if not k.startswith("teacher.")},
        "student_linear_top1": metrics["student"]["linear_top1"],
        "student_zeroshot_top1": metrics["student"]["zeroshot_top1"],
        "teacher_zeroshot_top1": metrics["teacher"]["zeroshot_top1"],
        "views_per_image": header.views_per_image,
        "topk": header.topk,
        "bytes_per_view": round(stored_bytes_per_view(header.num_anchors, header.views_per_image,
                                                      header.topk, header.embed_dim,
                                                      header.store_embeddings), 1),
    }
    if teacher_metrics is not None:
        result.update(teacher_linear_top1=metrics["teacher"]["linear_top1"],
                      teacher_steps=teacher_metrics["steps"],
                      teacher_minutes=round(teacher_metrics["train_seconds"] / 60, 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--rows-file", default="params/ablation.yaml")
    parser.add_argument("--rows", nargs="*", help="run only these rows (names as in the rows file)")
    parser.add_argument("--json", default="metrics/ablation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = yaml.safe_load(Path(args.rows_file).read_text())
    unknown = set(args.rows or []) - set(rows)
    if unknown:
        raise SystemExit(f"{args.rows_file}: no row(s) {', '.join(sorted(unknown))}")
    try:
        results = [run_row(name, overrides or {}, Path(args.params)) for name, overrides in rows.items()
                   if not args.rows or name in args.rows]
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None
    write_json(args.json, {"rows": results})
    if all("teacher_steps" in r for r in results):
        print("| row | teacher steps | teacher minutes | teacher zero-shot top-1 | teacher linear top-1 | "
              "student linear top-1 | student zero-shot top-1 |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['row']} | {r['teacher_steps']} | {r['teacher_minutes']} | "
                  f"{100 * r['teacher_zeroshot_top1']:.1f} | {100 * r['teacher_linear_top1']:.1f} | "
                  f"{100 * r['student_linear_top1']:.1f} | {100 * r['student_zeroshot_top1']:.1f} |")
        return
    print("| row | student linear top-1 | student zero-shot top-1 | V | top-k | bytes / view |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {100 * r['student_linear_top1']:.1f} | {100 * r['student_zeroshot_top1']:.1f} | "
              f"{r['views_per_image']} | {r['topk'] or 'full'} | {r['bytes_per_view']} |")


if __name__ == "__main__":
    main()
