"""scripts/results.py: the committed result pages are what their JSON generates, and a page edited by
hand (or a README demo table typed in) is caught."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts/results.py"
spec = importlib.util.spec_from_file_location("results", SCRIPT)
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)

# A probe metrics file as stages/probe.py writes it (fractions of 64 val images).
PROBE = {
    "teacher": {"linear_top1": 0.8125, "linear_top5": 0.90625, "zeroshot_top1": 1.0, "zeroshot_top5": 1.0,
                "zeroshot_top1_plain": 0.921875, "zeroshot_top1_cpa": 1.0},
    "student": {"linear_top1": 0.75, "linear_top5": 0.96875, "linear_top1_embedding": 0.6875,
                "linear_top5_embedding": 0.9375, "zeroshot_top1": 0.5, "zeroshot_top5": 0.9375},
    "random_init": {"linear_top1": 0.046875, "linear_top5": 0.203125},
    "supervised": {"linear_top1": 0.5, "linear_top5": 0.875},
}


def check(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True,
                          text=True, timeout=120)


def test_committed_pages_and_readme_table_are_what_their_json_generates():
    # no skip: metrics/probe.json is committed with the demo run; without it this fails and says so
    result = check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["hard_world_table.py", "psd_table.py", "claims.py"])
def test_the_derived_studies_are_what_their_sources_give(script):
    """docs/results/hard-world-table.json and claims.json are computed from other study files:
    committed as their scripts compute them from the committed sources."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_effective_robustness_is_the_distance_above_the_supervised_logit_line():
    spec = importlib.util.spec_from_file_location("hard_world_table", ROOT / "scripts/hard_world_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    # supervised points on logit(shifted) = 0.5 logit(id) - 1 exactly
    points = []
    for accuracy in (50.0, 73.105858, 88.079708):  # logits 0, 1, 2
        shifted = table.sigmoid(0.5 * table.logit(accuracy) - 1)
        points.append({"figures": {"supervised_linear_top1": accuracy, "supervised_shifted_linear_top1": shifted}})
    slope, intercept, n = table.supervised_line(points)
    assert (round(slope, 6), round(intercept, 6), n) == (0.5, -1.0, 3)
    # at 73.1 in distribution the line predicts sigmoid(-0.5) = 37.75%: 50% shifted is 12.25 points above it
    assert table.robustness(73.105858, 50.0, (slope, intercept, n)) == 12.25


def test_psd_table_means_the_seeds_and_pairs_psd_with_clip_at_the_same_seed():
    spec = importlib.util.spec_from_file_location("psd_table", ROOT / "scripts/psd_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    def teacher(objective: str, seed: int, base: float, images: int = 0) -> dict:
        figures = {key: base + i for i, key in enumerate(table.MEASURES.values())}
        return {"params": {"demo_teacher.caption_noise": 0.3, "demo_teacher.objective": objective,
                           "demo_teacher.seed": seed, "demo_teacher.train_images": images,
                           "demo_teacher.steps": 100, "demo_teacher.batch_size": 64},
                "figures": {**figures, "teacher_last_interval_gain": 0.5, "teacher_peak_zeroshot_top1": base + 1}}

    records = [teacher("clip", 1, 40.0), teacher("clip", 2, 44.0), teacher("psd", 1, 43.0), teacher("psd", 2, 43.0),
               teacher("clip", 1, 30.0, 1600), teacher("psd", 1, 32.5, 1600)]
    clip, psd, difference, finite_clip, finite_psd, finite_difference = table.table_rows(records)
    assert clip["label"] == "CLIP, noise 0.3" and clip["figures"]["zeroshot"] == 42.0
    assert clip["figures"]["zeroshot_seeds"] == {"min": 40.0, "max": 44.0} and clip["figures"]["seeds"] == 2
    assert clip["figures"]["peak_zeroshot"] == 43.0 and psd["figures"]["linear"] == 44.0
    # per seed: PSD - CLIP is +3 at seed 1 and -1 at seed 2, in every measure
    assert difference["figures"]["zeroshot"] == 1.0
    assert difference["figures"]["shifted_linear_seeds"] == {"min": -1.0, "max": 3.0}
    assert (difference["figures"]["psd_ahead"], difference["figures"]["comparisons"]) == (6, 12)
    # a finite set of 1,600 images is its own setting: 100 steps x 64 captions are 4 epochs of it
    assert finite_clip["label"] == "CLIP, noise 0.3, 1,600 images x 4 epochs"
    assert finite_psd["params"]["demo_teacher.train_images"] == 1600
    assert finite_difference["label"] == "PSD - CLIP, noise 0.3, 1,600 images x 4 epochs"
    assert finite_difference["figures"]["zeroshot"] == 2.5 and finite_difference["figures"]["seeds"] == 1


@pytest.fixture
def project(tmp_path):
    """A copy of docs/results, a README with the demo-table markers and a probe metrics file, rendered."""
    shutil.copytree(ROOT / "docs/results", tmp_path / "docs/results")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/probe.json").write_text(json.dumps(PROBE))
    (tmp_path / "README.md").write_text(f"# demo\n\nbefore\n\n{results.START}\nstale\n{results.END}\n\nafter\n")
    assert results.main(["--root", str(tmp_path)]) == 0
    return tmp_path


def test_a_figure_changed_by_hand_in_a_page_is_named(project):
    assert check(project).returncode == 0
    page = sorted(p for p in (project / "docs/results").glob("*.md") if p.name != "README.md")[0]
    text = page.read_text()
    row = next(line for line in text.splitlines()
               if line.startswith("| ") and not line.startswith("| *") and re.search(r"\| \d", line))
    edited = re.sub(r"\| (\d)", lambda m: f"| {(int(m.group(1)) + 1) % 10}", row, count=1)
    page.write_text(text.replace(row, edited, 1))
    result = check(project)
    assert result.returncode == 1
    named = [line.split(":")[0] for line in result.stdout.splitlines() if ": " in line]
    assert named == [f"docs/results/{page.name}"], result.stdout


def test_a_demo_table_typed_into_the_readme_is_named(project):
    readme = project / "README.md"
    readme.write_text(readme.read_text().replace("| 81.25 |", "| 81.3 |"))
    result = check(project)
    assert result.returncode == 1 and result.stdout.startswith("README.md: the demo table differs"), result.stdout


def test_missing_probe_metrics_and_missing_markers_fail_with_one_line(project):
    (project / "metrics/probe.json").unlink()
    result = check(project)
    assert result.returncode == 1 and "metrics/probe.json: missing" in result.stdout
    (project / "README.md").write_text("# no markers\n")
    (project / "metrics/probe.json").write_text(json.dumps(PROBE))
    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(project)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no demo table markers" in result.stderr


def test_readme_block_is_replaced_and_nothing_else():
    text = f"intro\n{results.START}\nold table\n{results.END}\nrest\n"
    assert results.replace_block(text, "NEW", "README.md") == f"intro\n{results.START}\nNEW\n{results.END}\nrest\n"


def test_probe_table_renders_exactly():
    assert results.render_probe_table(PROBE) == "\n".join([
        "| model | linear top-1 | linear top-5 | zero-shot top-1 | zero-shot top-5 |",
        "|---|---|---|---|---|",
        "| teacher | 81.25 | 90.62 | 100.0 | 100.0 |",
        "| student | 75.0 | 96.88 | 50.0 | 93.75 |",
        "| random-init student | 4.69 | 20.31 | - | - |",
        "| supervised reference | 50.0 | 87.5 | - | - |",
        "",
        "teacher zero-shot top-1 with plain / CPA class anchors: 92.19 / 100.0; student linear top-1 on its "
        "projected embedding: 68.75; student - teacher linear top-1: -6.2 points; student / teacher zero-shot "
        "top-1: 0.50 (`metrics/probe.json`).",
    ])


SMALL = {
    "study": "small",
    "title": "A small study",
    "description": "What varied: views. Held fixed: 4 epochs.",
    "columns": [{"header": "row", "field": "label"}, {"header": "V", "param": "precompute.views"},
                {"header": "top-k", "param": "precompute.topk", "map": {"0": "full"}},
                {"header": "linear", "figure": "linear_top1"},
                {"header": "distill", "figure": "distill_s", "format": "duration"},
                {"header": "note", "field": "note"}],
    "units": {"linear_top1": "%", "distill_s": "s"},
    "records": [
        {"label": "baseline", "group": "tau 0.1", "params": {"precompute.views": 4, "precompute.topk": 0},
         "figures": {"linear_top1": 86.6, "distill_s": 158}, "machine": "2-core CPU", "source": "README"},
        {"label": "top-1 | hard", "group": "tau 0.1", "params": {"precompute.views": 4, "precompute.topk": 1},
         "figures": {"linear_top1": {"min": 48, "max": 64}, "distill_s": 59}, "note": "by seed",
         "machine": "2-core CPU", "source": "README"},
        {"label": "V = 1", "group": "tau 0.05", "params": {"precompute.views": 1, "precompute.topk": 0},
         "figures": {"linear_top1": 83.2}, "machine": "8-core CPU", "source": "README"},
    ],
    "notes": ["Only gaps of 3 or more are findings."],
}


def test_a_small_study_renders_exactly():
    assert results.render_study(SMALL, "small.json") == "\n".join([
        results.GENERATED.format(source="small.json"),
        "# A small study",
        "",
        "What varied: views. Held fixed: 4 epochs.",
        "",
        "| row | V | top-k | linear | distill | note |",
        "|---|---|---|---|---|---|",
        "| *tau 0.1* |  |  |  |  |  |",
        "| baseline | 4 | full | 86.6 | 2 min 38 s |  |",
        "| top-1 \\| hard | 4 | 1 | 48-64 | 59 s | by seed |",
        "| *tau 0.05* |  |  |  |  |  |",
        "| V = 1 | 1 | full | 83.2 |  |  |",
        "",
        "Units: linear: %; distill: s.",
        "",
        "Measured on: 2-core CPU (2 records); 8-core CPU (1 record).",
        "",
        "Source: README.",
        "",
        "## Notes",
        "",
        "- Only gaps of 3 or more are findings.",
        "",
    ])


def test_transposed_study_renders_records_as_columns():
    study = {**SMALL, "transpose": True, "columns": SMALL["columns"][:1] + SMALL["columns"][3:4],
             "records": SMALL["records"][:2]}
    assert results.study_table(study) == ["| row | baseline | top-1 \\| hard |", "|---|---|---|",
                                          "| linear | 86.6 | 48-64 |"]


def test_a_record_with_the_same_params_replaces_the_old_one_others_are_appended():
    rerun = {**SMALL["records"][1], "figures": {"linear_top1": 60.0}, "group": "re-run"}
    new = {**SMALL["records"][2], "params": {"precompute.views": 8, "precompute.topk": 0}}
    merged = results.merge_records(SMALL, [rerun, new])["records"]
    assert [r["label"] for r in merged] == ["baseline", "top-1 | hard", "V = 1", "V = 1"]
    assert merged[1]["figures"] == {"linear_top1": 60.0} and merged[3]["params"]["precompute.views"] == 8


def test_a_study_file_with_an_unknown_key_or_a_figure_without_unit_is_refused(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({**SMALL, "records": [{**SMALL["records"][0], "runs": 3}]}))
    with pytest.raises(results.ResultsError, match=r"small.json: record 1 \('baseline'\): unknown key\(s\) runs"):
        results.load_study(path)
    path.write_text(json.dumps({**SMALL, "units": {"linear_top1": "%"}}))
    with pytest.raises(results.ResultsError, match="no unit for figure.s. distill_s"):
        results.load_study(path)
