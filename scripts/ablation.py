"""The demo ablation: anchors, loss, top-k targets and views per image at equal training budget.

Every row of `params/ablation.yaml` is `params.yaml` with a few overrides; the row runs
precompute (shared between rows with the same precompute settings), distill and probe (the
supervised reference too with `--supervised`) into data/ablation/<row>/. Each row becomes one record of the study
file `--json` names (docs/results/ablation.json by default): the row's resolved overrides and the
settings that decide its result (RECORDED), the teacher's identity, its figures (percentages of
the val images, bytes per view) and where it ran. A record already there with the same settings
is replaced, any other is kept; the study's page (docs/results/<study>.md) is then re-rendered
by scripts/results.py. The script also prints the rows it ran as a markdown table. Rows already
done (their probe.json exists) are not run again, so an interrupted ablation continues where it
stopped; a row whose resolved settings changed (its overrides, params.yaml's defaults, the
teacher) runs again.

    python scripts/ablation.py                 # all rows
    python scripts/ablation.py --rows "V = 1"  # some rows

Rows that override `demo_teacher.*` first pre-train their own teacher with the demo-teacher
stage (shared between rows with the same teacher settings, in data/ablation/teachers/) and use
it as the teacher of their cache; `params/teachers.yaml` compares teacher pre-training that way
(CLIP vs PSD, two-tower vs MS-CLIP), and the table then adds the teacher's columns:

    python scripts/ablation.py --rows-file params/teachers.yaml --json docs/results/teachers.json

The seed study is rows of `params/seeds.yaml` (the demo's defaults, one seed each), with the
supervised reference at the same seed:

    python scripts/ablation.py --rows-file params/seeds.yaml --json docs/results/demo-seeds.json --supervised
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import results  # scripts/results.py, the one renderer of docs/results (run as a script, its folder is on sys.path)
import torch
import yaml
from safetensors.torch import save

from pipeline.atomic import write_json
from pipeline.cache import TeacherCache, stored_bytes_per_view
from pipeline.config import DEFAULT_PARAMS, load_config, override, to_dict
from pipeline.errors import PipelineError
from pipeline.student import build_student
from pipeline.teacher import load_teacher, resolve_device, teacher_identity
from stages import demo_teacher, distill, precompute, probe, ssl, supervised

OUT = Path("data/ablation")
SCRIPT_DIR = Path(__file__).resolve().parent
# What a record states besides the row's own overrides: the settings that decide its figures
# (resolved from params.yaml and the row), by config. Paths, workers and devices are left out.
RECORDED = {
    "precompute": ("views", "topk", "store_embeddings", "crop_scale", "crop_ratio", "flip", "seed", "precision"),
    "prompts": ("set", "anchors"),
    "train": ("shards", "arch", "head", "head_hidden", "image_size", "epochs", "batch_size", "optimizer", "lr",
              "weight_decay", "momentum", "warmup_epochs", "seed", "mix_shards", "precision"),
    "distill": ("loss", "tau_teacher", "tau_student", "embedding_weight"),
    "demo_teacher": ("config", "arch", "objective", "psd_rho", "psd_alpha_max", "psd_ramp", "steps", "batch_size",
                     "lr", "warmup_steps", "weight_decay", "seed", "caption_noise", "train_images"),
}
PERCENT = "% of the val images (top-1)"
UNITS = {"student_linear_top1": PERCENT + ", linear probe", "student_zeroshot_top1": PERCENT + ", zero-shot",
         "teacher_linear_top1": PERCENT + ", linear probe", "teacher_zeroshot_top1": PERCENT + ", zero-shot",
         "supervised_linear_top1": PERCENT + ", linear probe of the supervised reference",
         "bytes_per_view": "B stored per view (pipeline.cache.stored_bytes_per_view)",
         "student_parameters": "parameters of the student (backbone and head)",
         "student_weights_mb": "MB of the student's weights as float32 safetensors",
         "random_linear_top1": PERCENT + ", linear probe of the random-init student",
         "teacher_errors_related": "% of the teacher's zero-shot errors on a related class (hard world: a twin)",
         "student_errors_related": "% of the student's zero-shot errors on a related class (hard world: a twin)",
         "errors_related_chance": "% of errors a uniformly drawn wrong class would put on a related class",
         "teacher_steps": "training steps of the teacher",
         "simclr_linear_top1": PERCENT + ", linear probe of the SimCLR baseline (same images and epochs)",
         "byol_linear_top1": PERCENT + ", linear probe of the BYOL baseline (same images and epochs)",
         "simclr_last_epoch_loss_ratio": "SimCLR's last-epoch loss / the epoch before's (1: flat)",
         "byol_last_epoch_loss_ratio": "BYOL's last-epoch loss / the epoch before's (1: flat)",
         "simclr_final_loss": "SimCLR's NT-Xent loss in its last epoch",
         "byol_final_loss": "BYOL's loss (negative cosine) in its last epoch",
         **{f"{model}_shifted_linear_top1": "% of the shifted split's images (top-1), linear probe fitted on train"
            for model in ("teacher", "student", "supervised", "random", "simclr", "byol")},
         **{f"{model}_shifted_zeroshot_top1": "% of the shifted split's images (top-1), zero-shot"
            for model in ("teacher", "student")},
         **{f"{model}_{direction}_r{k}": f"% recall@{k}, {direction.replace('_', ' ')} on the val captions"
            for model in ("teacher", "student") for direction in ("image_to_text", "text_to_image")
            for k in (1, 5)},
         "teacher_minutes": "minutes of teacher training (wall clock)",
         "teacher_zeroshot_top1_plain": PERCENT + ", zero-shot with plain prompts",
         "teacher_last_interval_gain": "points of CPA zero-shot top-1 gained over the teacher's last evaluation "
                                       "interval (near 0: converged)",
         "teacher_peak_zeroshot_top1": PERCENT + ", zero-shot (CPA), the best of the teacher's logged evaluations "
                                       "and its final one (above the final: it got worse with training)"}
GROUP = "run by scripts/ablation.py"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def stage_changes(overrides: dict[str, object], stage: str) -> dict[str, object]:
    """The overrides of one stage: 'precompute.views' -> {'views': ...}; shared sections go to all."""
    changes = {}
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        if section == stage:
            changes[rest] = value
        elif stage == "supervised":  # the supervised reference reads the train section only
            if section == "train":
                changes[key] = value
        elif section == "prompts" or (section == "teacher" and stage != "demo_teacher"):
            changes[key] = value
        elif section == "train" and stage == "distill":
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


def run_row(name: str, overrides: dict[str, object], params: Path, with_supervised: bool = False,
            ssl_methods: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one row (or reuse its finished run) and return its record; `with_supervised` also trains
    the supervised reference with the row's train settings and probes it beside the student, and
    `ssl_methods` the SSL baselines (simclr, byol) the same way."""
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
    supervised_config = override(load_config("supervised", params), {
        **stage_changes(overrides, "supervised"), "train.cache": str(cache_path),
        "out": str(row_dir / "supervised.pt"), "run_dir": str(row_dir / "supervised-run"),
        "metrics": str(row_dir / "supervised.json"), "plot": str(row_dir / "supervised.csv")})
    ssl_configs = {method: override(load_config("ssl", params), {
        **stage_changes(overrides, "supervised"), "method": method, "train.cache": str(cache_path),
        "out": str(row_dir / f"{method}.pt"), "run_dir": str(row_dir / f"{method}-run"),
        "metrics": str(row_dir / f"{method}.json"), "plot": str(row_dir / f"{method}.csv")})
        for method in ssl_methods}
    probe_config = override(load_config("probe", params), {
        **stage_changes(overrides, "probe"), "cache": str(cache_path),
        "student": str(row_dir / "student.pt"), "supervised": supervised_config.out if with_supervised else "",
        "baselines": ",".join(f"{method}={config.out}" for method, config in ssl_configs.items()),
        "out": str(result_path), "plots": str(row_dir), "distill_csv": str(row_dir / "distill.csv")})
    # A finished row is reused only while its resolved settings (and so its cache) are the same:
    # after a change of params.yaml's defaults the row runs again.
    stamp = {"distill": to_dict(distill_config), "probe": to_dict(probe_config)}
    if with_supervised:
        stamp["supervised"] = to_dict(supervised_config)
    for method, config in ssl_configs.items():
        stamp[method] = to_dict(config)
    stamp = json.loads(json.dumps(stamp))
    stamp_path = row_dir / "settings.json"
    if not (result_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp):
        result_path.unlink(missing_ok=True)
        distill.run(distill_config)
        if with_supervised:
            supervised.run(supervised_config)
        for config in ssl_configs.values():
            ssl.run(config)
        probe.run(probe_config)
        write_json(stamp_path, stamp)
    header = TeacherCache(cache_path).header
    metrics = json.loads(result_path.read_text())
    figures = {
        "student_linear_top1": percent(metrics["student"]["linear_top1"]),
        "student_zeroshot_top1": percent(metrics["student"]["zeroshot_top1"]),
        "teacher_linear_top1": percent(metrics["teacher"]["linear_top1"]),
        "teacher_zeroshot_top1": percent(metrics["teacher"]["zeroshot_top1"]),
        "bytes_per_view": round(stored_bytes_per_view(header.num_anchors, header.views_per_image, header.topk,
                                                      header.embed_dim, header.store_embeddings), 1),
    }
    figures.update(student_size(row_dir / "student.pt"))
    if "random_init" in metrics:
        figures["random_linear_top1"] = percent(metrics["random_init"]["linear_top1"])
    figures.update(related_errors(row_dir / "confusion.json"))
    configs = {"precompute": precompute_config, "prompts": precompute_config.prompts, "train": distill_config.train,
               "distill": distill_config, "probe": probe_config}
    if with_supervised:
        figures["supervised_linear_top1"] = percent(metrics["supervised"]["linear_top1"])
    for method, config in ssl_configs.items():
        trained = json.loads(Path(config.metrics).read_text())
        figures.update({f"{method}_linear_top1": percent(metrics[method]["linear_top1"]),
                        f"{method}_final_loss": round(trained["final_loss"], 4),
                        f"{method}_last_epoch_loss_ratio": round(trained["last_epoch_loss_ratio"], 4)})
    figures.update(shift_and_retrieval(metrics))
    if teacher_metrics is not None:
        configs["demo_teacher"] = override(load_config("demo_teacher", params),
                                           stage_changes(overrides, "demo_teacher"))
        figures.update(teacher_steps=teacher_metrics["steps"],
                       teacher_minutes=round(teacher_metrics["train_seconds"] / 60, 1))
    return {
        "label": name,
        "group": GROUP,
        "params": {**recorded_params(overrides, configs),
                   "teacher.identity": teacher_identity(precompute_config.teacher)},
        "figures": figures,
        "machine": machine(resolve_device(distill_config.train.device)),
        "commit": code_version(),
        "measured": date.fromtimestamp(result_path.stat().st_mtime).isoformat(),
    }


def run_teacher_row(name: str, overrides: dict[str, object], params: Path) -> dict[str, Any]:
    """A teacher-only row: pre-train the row's teacher (or reuse it) and measure it on its own
    (`stages.probe.measure_teacher`: linear probe, zero-shot, the shifted split, retrieval), with
    no cache and no student. Its record's figures are the teacher's, with its training log's
    convergence: the zero-shot gain over the last evaluation interval, and its best logged zero-shot."""
    if not any(k.startswith("demo_teacher.") for k in overrides):
        raise PipelineError(f"row '{name}': --teacher-only rows pre-train a teacher (demo_teacher.* overrides)")
    teacher = row_teacher(overrides, params)
    teacher_metrics = teacher.pop("_metrics")
    overrides = {**overrides, **teacher}
    probe_config = override(load_config("probe", params), stage_changes(overrides, "probe"))
    measured_path = Path(str(teacher["teacher.checkpoint"])).with_suffix(".measures.json")
    if not measured_path.is_file():
        device = resolve_device(probe_config.device)
        model = load_teacher(probe_config.teacher, str(device), precision=probe_config.precision)
        write_json(measured_path, probe.measure_teacher(model, probe_config.shards, probe_config.prompts, device,
                                                        batch_size=probe_config.batch_size,
                                                        workers=probe_config.workers,
                                                        holdout_fraction=probe_config.holdout_fraction,
                                                        seed=probe_config.seed))
    measured = json.loads(measured_path.read_text())
    figures = {"teacher_steps": teacher_metrics["steps"],
               "teacher_minutes": round(teacher_metrics["train_seconds"] / 60, 1),
               "teacher_zeroshot_top1": percent(measured["zeroshot_top1"]),
               "teacher_zeroshot_top1_plain": percent(measured["zeroshot_top1_plain"]),
               "teacher_linear_top1": percent(measured["linear_top1"])}
    figures.update(shift_and_retrieval({"teacher": measured}))
    evaluated = [entry for entry in teacher_metrics["history"] if "cpa" in entry]
    if evaluated:  # the last logged evaluation before the end, against the final measurement
        figures["teacher_last_interval_gain"] = round(100 * (teacher_metrics["zero_shot_top1_cpa"]
                                                             - evaluated[-1]["cpa"]), 2)
        figures["teacher_peak_zeroshot_top1"] = percent(max([entry["cpa"] for entry in evaluated]
                                                            + [teacher_metrics["zero_shot_top1_cpa"]]))
    configs = {"demo_teacher": override(load_config("demo_teacher", params), stage_changes(overrides, "demo_teacher"))}
    return {
        "label": name,
        "group": GROUP,
        "params": {**recorded_params(overrides, configs), "teacher.identity": teacher_metrics["identity"]},
        "figures": figures,
        "machine": machine(resolve_device(probe_config.device)),
        "commit": code_version(),
        "measured": date.fromtimestamp(measured_path.stat().st_mtime).isoformat(),
    }


def shift_and_retrieval(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The shifted split's accuracy of every model and the val-caption retrieval of teacher and
    student, where probe measured them (shards with a shifted split; val shards with captions)."""
    figures = {}
    for model, row in metrics.items():
        name = "random" if model == "random_init" else model
        for key in ("shifted_linear_top1", "shifted_zeroshot_top1"):
            if key in row:
                figures[f"{name}_{key}"] = percent(row[key])
        for key, value in row.items():
            if key.startswith("retrieval_"):
                figures[f"{name}_{key.removeprefix('retrieval_')}"] = percent(value)
    return figures


def related_errors(path: Path) -> dict[str, float]:
    """From probe's confusion summary, where the shards say which classes are related: the share
    of the teacher's and the student's zero-shot errors on a related class, and its chance."""
    if not path.is_file():
        return {}
    models = json.loads(path.read_text())["models"]
    if "related_share" not in models.get("teacher", {}):
        return {}
    return {"teacher_errors_related": percent(models["teacher"]["related_share"]),
            "student_errors_related": percent(models["student"]["related_share"]),
            "errors_related_chance": percent(models["teacher"]["related_chance"])}


def student_size(checkpoint: Path) -> dict[str, float]:
    """The student's parameter count and the size of its weights written as safetensors (float32)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    parameters = sum(p.numel() for p in build_student(saved["model"]).parameters())
    weights = save({k: v.contiguous() for k, v in saved["state_dict"].items()})  # channels_last -> row-major
    return {"student_parameters": parameters, "student_weights_mb": round(len(weights) / 1e6, 2)}


def percent(fraction: float) -> float:
    """A probe fraction as a percentage (4 decimals: drops float noise such as 98.65000000000001)."""
    return round(100 * fraction, 4)


def recorded_params(overrides: dict[str, object], configs: dict[str, Any]) -> dict[str, Any]:
    """The row's overrides and RECORDED, as dotted keys with the values the stages resolved."""
    keys = [k for k in overrides if not k.startswith("teacher.")]  # the teacher goes in by its identity
    keys += [f"{section}.{field}" for section, fields in RECORDED.items() if section in configs for field in fields]
    recorded = {}
    for key in dict.fromkeys(keys):
        section, *path = key.split(".")
        if section not in configs:  # a section no stage of the row reads: recorded as given
            recorded[key] = overrides[key]
            continue
        value: Any = to_dict(configs[section])
        for part in path:
            value = value[part]
        recorded[key] = value
    return recorded


def machine(device: torch.device) -> str:
    """Where a row ran, in words: the CPU (model, cores this process may use) and the GPU if any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    where = f"{cores}-core CPU ({model})"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    return where


def code_version() -> str | None:
    """The project's commit (with -dirty when its tracked files differ), or None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SCRIPT_DIR), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def skeleton(path: Path, rows_file: str, teacher_rows: bool, teacher_only: bool = False,
             params: str = str(DEFAULT_PARAMS)) -> dict[str, Any]:
    """A new study file for these rows: the columns of the README's tables, no records yet."""
    settings: list[dict[str, Any]] = []
    if teacher_only:
        figures = [("steps", "teacher_steps"), ("minutes", "teacher_minutes"),
                   ("zero-shot top-1", "teacher_zeroshot_top1"), ("linear top-1", "teacher_linear_top1"),
                   ("shifted zero-shot", "teacher_shifted_zeroshot_top1"),
                   ("shifted linear", "teacher_shifted_linear_top1"),
                   ("image-to-text R@1", "teacher_image_to_text_r1"), ("text-to-image R@1", "teacher_text_to_image_r1"),
                   ("last-interval gain", "teacher_last_interval_gain"),
                   ("peak zero-shot", "teacher_peak_zeroshot_top1")]
    elif teacher_rows:
        figures = [("teacher steps", "teacher_steps"), ("teacher minutes", "teacher_minutes"),
                   ("teacher zero-shot top-1", "teacher_zeroshot_top1"),
                   ("teacher linear top-1", "teacher_linear_top1"), ("student linear top-1", "student_linear_top1"),
                   ("student zero-shot top-1", "student_zeroshot_top1")]
    else:
        figures = [("student linear top-1", "student_linear_top1"),
                   ("student zero-shot top-1", "student_zeroshot_top1"), ("bytes / view", "bytes_per_view")]
        settings = [{"header": "V", "param": "precompute.views"},
                    {"header": "top-k", "param": "precompute.topk", "map": {"0": "full"}}]
    if teacher_only:
        title = f"Teachers of {rows_file}, each pre-trained and measured alone"
        description = (f"`python scripts/ablation.py --params {params} --rows-file {rows_file} --json {path} "
                       "--teacher-only`: every row pre-trains a demo teacher from scratch (the demo-teacher stage with "
                       "the row's overrides of the params) and measures it alone, with no cache or student "
                       "(`stages.probe.measure_teacher`): zero-shot with CPA class prompts, the linear probe of its "
                       "image embeddings, both on val and on the shifted split, and image-text recall on the val "
                       "captions.")
    else:
        title = f"Rows of {rows_file}"
        description = (f"`python scripts/ablation.py --rows-file {rows_file} --json {path}`: every row is params.yaml "
                       "with the row's overrides, run through precompute, distill and probe.")
    return {
        "study": path.stem,
        "title": title,
        "description": description,
        **({"notes": ["Minutes are wall clock on a shared 2-core machine: they include the time other jobs took "
                      "from the run."]} if teacher_only else {}),
        "columns": [{"header": "row", "field": "label"}, *settings,
                    *({"header": header, "figure": figure} for header, figure in figures),
                    {"header": "measured", "field": "measured"}, {"header": "note", "field": "note"}],
        "units": UNITS,
        "records": [],
    }


def print_table(records: list[dict[str, Any]], study: dict[str, Any]) -> None:
    """The rows just run, as a markdown table of the study's columns (results.py's cells, without
    the measured and note columns)."""
    columns = [c for c in study["columns"] if c.get("field") not in ("measured", "note")]
    print("\n".join(results.table([c["header"] for c in columns],
                                  [[results.cell(r, c, study) for c in columns] for r in records])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--rows-file", default="params/ablation.yaml")
    parser.add_argument("--rows", nargs="*", help="run only these rows (names as in the rows file)")
    parser.add_argument("--json", default="docs/results/ablation.json",
                        help="the study file the rows' records go to (created if absent); its page is re-rendered")
    parser.add_argument("--supervised", action="store_true",
                        help="also train the supervised reference of every row (its train settings) and probe it")
    parser.add_argument("--teacher-only", action="store_true",
                        help="rows pre-train their teacher and measure it alone (no precompute, distill or student)")
    parser.add_argument("--ssl", nargs="*", default=[], choices=("simclr", "byol"),
                        help="also train these SSL baselines of every row (its train settings) and probe them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = yaml.safe_load(Path(args.rows_file).read_text())
    unknown = set(args.rows or []) - set(rows)
    if unknown:
        raise SystemExit(f"{args.rows_file}: no row(s) {', '.join(sorted(unknown))}")
    chosen = {name: overrides or {} for name, overrides in rows.items() if not args.rows or name in args.rows}
    study = Path(args.json)
    teacher_rows = any(k.startswith("demo_teacher.") for overrides in chosen.values() for k in overrides)
    new_study = skeleton(study, args.rows_file, teacher_rows, args.teacher_only, args.params)
    records = []
    try:
        for name, overrides in chosen.items():
            run = (run_teacher_row(name, overrides, Path(args.params)) if args.teacher_only else
                   run_row(name, overrides, Path(args.params), args.supervised, tuple(args.ssl)))
            record = {**run,
                      "source": f"scripts/ablation.py --rows-file {args.rows_file}"}
            results.update_study(study, [record], new_study)  # each finished row is on record at once
            records.append(record)
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None
    print_table(records, new_study)
    print(f"wrote {len(records)} record(s) to {study} and its page {study.with_suffix('.md')}")


if __name__ == "__main__":
    main()
