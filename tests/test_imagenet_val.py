"""ImageNet's val split as distributed: one flat folder of JPEGs, labelled by Kaggle's
LOC_val_solution.csv or by the devkit's ground-truth file and meta.mat, written as val shards."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.io

from pipeline.errors import PipelineError
from pipeline.shards import iter_shard, list_shards, read_classes
from stages import shards as shards_stage
from tests.conftest import stage_config, write_image
from tests.test_cli import cli, one_line_error

# Train class folders; in sorted order they get the labels 0, 1, 2.
TRAIN_WNIDS = ["n01440764", "n01443537", "n01484850"]
# The class of each val image ILSVRC2012_val_0000000{i}.JPEG; 7 and 8 are labelled but not in the folder.
VAL_WNIDS = {1: "n01484850", 2: "n01440764", 3: "n01443537", 4: "n01440764", 5: "n01484850",
             6: "n01443537", 7: "n01440764", 8: "n01484850"}
IN_FOLDER = range(1, 7)
# The devkit's class ids, deliberately not in sorted-wnid order: a mapping by position or by sorted
# wnid would label the images wrongly. 4 is a leaf class that has no train folder.
DEVKIT_IDS = {"n01484850": 1, "n01443537": 2, "n01440764": 3, "n09999999": 4}
# Non-leaf synsets (num_children > 0), listed first in meta.mat as in no real order.
DEVKIT_PARENTS = [(1001, "n00001740", "entity", [1, 2, 3, 4]), (1002, "n01471682", "vertebrate", [1, 2, 3])]


def image_id(index: int) -> str:
    return f"ILSVRC2012_val_{index:08d}"


def write_loc_csv(path, wnids: dict[int, str]):
    """As Kaggle ships it: header, rows in no particular order, boxes `wnid x y x y` (some images have
    several), a trailing space after the last box."""
    rows = []
    for index in sorted(wnids, key=lambda i: (i * 5) % 11):
        boxes = f"{wnids[index]} {10 + index} 20 {200 + index} 180 "
        if index % 2:
            boxes += f"{wnids[index]} 5 6 70 80 "
        rows.append(f"{image_id(index)},{boxes}")
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return path


def write_devkit(devkit_data, wnids: dict[int, str]):
    """ILSVRC2012_devkit_t12/data/: the ground truth (line i: class id of image i) and meta.mat with the
    devkit's `synsets` struct array (1x1 doubles, char arrays, children as a row of ids)."""
    devkit_data.mkdir(parents=True, exist_ok=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, wnid, words, f"{words} (gloss)", len(children), np.array([children], float), 3, 0)
            for i, wnid, words, children in DEVKIT_PARENTS]
    rows += [(i, wnid, f"class {wnid}", "a leaf", 0, np.zeros((1, 0)), 0, 1300) for wnid, i in DEVKIT_IDS.items()]
    synsets = np.empty((len(rows), 1), dtype=[(name, object) for name in fields])
    for row, values in enumerate(rows):
        for name, value in zip(fields, values, strict=True):
            synsets[row, 0][name] = np.array([[value]], float) if isinstance(value, int) else value
    scipy.io.savemat(devkit_data / "meta.mat", {"synsets": synsets})
    truth = devkit_data / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{DEVKIT_IDS[wnids[i]]}\n" for i in sorted(wnids)))
    return truth


@pytest.fixture
def imagenet(tmp_path):
    """train/<wnid>/ (3 classes x 4 JPEGs), a flat val/ of 6 JPEGs and a README, both label files."""
    for c, wnid in enumerate(TRAIN_WNIDS):
        for i in range(4):
            write_image(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG", seed=10 * c + i)
    for i in IN_FOLDER:
        write_image(tmp_path / "val" / f"{image_id(i)}.JPEG", seed=100 + i)
    (tmp_path / "val" / "README.txt").write_text("not an image\n")
    write_loc_csv(tmp_path / "LOC_val_solution.csv", VAL_WNIDS)
    write_devkit(tmp_path / "ILSVRC2012_devkit_t12" / "data", VAL_WNIDS)
    return tmp_path


def loc(base):
    return base / "LOC_val_solution.csv"


def devkit(base):
    return base / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"


def flat_val_config(base, labels, out, **changes):
    settings = dict(source="folder", root=str(base / "train"), val_root=str(base / "val"),
                    val_labels=str(labels), out=str(out), val_fraction=0.0, max_per_shard=4, workers=1)
    return stage_config("shards", **{**settings, **changes})


def val_labels_of(out) -> dict[str, int]:
    return {s.key: s.label for i, shard in enumerate(list_shards(out, "val")) for s in iter_shard(shard, i)}


def test_loc_csv_parser_takes_the_first_token_of_the_boxes(imagenet):
    labels = shards_stage.loc_val_labels(loc(imagenet).read_text(), "LOC_val_solution.csv")
    assert labels == {image_id(i): wnid for i, wnid in VAL_WNIDS.items()}
    with pytest.raises(PipelineError, match="x.csv line 2: expected 'ImageId,PredictionString'"):
        shards_stage.loc_val_labels("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "x.csv")


def test_devkit_meta_maps_leaf_ids_and_ground_truth_lines(imagenet):
    wnids = shards_stage.read_meta_mat(devkit(imagenet).parent / "meta.mat")
    assert wnids == {1: "n01484850", 2: "n01443537", 3: "n01440764", 4: "n09999999"}  # no non-leaf synset
    labels = shards_stage.devkit_val_labels("3\n1\n4\n", wnids, "gt.txt")
    assert labels == {image_id(1): "n01440764", image_id(2): "n01484850", image_id(3): "n09999999"}
    with pytest.raises(PipelineError, match="gt.txt line 2: class id 1001 is not one of the 4 leaf classes"):
        shards_stage.devkit_val_labels("3\n1001\n", wnids, "gt.txt")


def test_both_label_formats_write_the_same_val_shards(imagenet, caplog):
    expected = {f"{image_id(i)}_JPEG": TRAIN_WNIDS.index(VAL_WNIDS[i]) for i in IN_FOLDER}
    outputs = {}
    for name, labels in (("loc", loc(imagenet)), ("devkit", devkit(imagenet))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stages.shards"):
            manifest = shards_stage.run(flat_val_config(imagenet, labels, imagenet / name))
        out = imagenet / name
        assert val_labels_of(out) == expected
        assert [c.id for c in read_classes(out)] == TRAIN_WNIDS
        assert manifest["splits"]["train"]["samples"] == 12 and manifest["splits"]["val"]["samples"] == 6
        written = json.loads((out / "manifest.json").read_text())
        assert written["val_labels"] == str(labels)
        assert [row["path"] for row in written["skipped"]] == [str(imagenet / "val" / "README.txt")]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"{labels} labels 2 image(s) that are not in {imagenet / 'val'}; a partial val "
                            "folder, they are left out", f"skipped 1 file(s); see {out / 'manifest.json'}"]
        outputs[name] = out
    for split in ("train", "val"):
        loc_shards, devkit_shards = list_shards(outputs["loc"], split), list_shards(outputs["devkit"], split)
        assert len(loc_shards) == (3 if split == "train" else 2)
        assert [p.read_bytes() for p in loc_shards] == [p.read_bytes() for p in devkit_shards]


def test_val_labels_without_val_root(imagenet):
    with pytest.raises(PipelineError) as error:
        shards_stage.run(flat_val_config(imagenet, loc(imagenet), imagenet / "out", val_root=""))
    assert str(error.value) == "option --val-labels needs --val-root, the flat folder of the val images it labels"


def test_label_of_a_class_without_train_folder(imagenet):
    labels = write_loc_csv(imagenet / "other.csv", {**VAL_WNIDS, 5: "n09999999"})
    with pytest.raises(PipelineError) as error:
        shards_stage.run(flat_val_config(imagenet, labels, imagenet / "out"))
    assert str(error.value) == (f"{labels}: image {image_id(5)} has class n09999999, which is not a class "
                                f"folder of --root {imagenet / 'train'}")
    # the same through the devkit: class id 4 is a leaf of meta.mat but has no train folder
    truth = write_devkit(imagenet / "devkit2" / "data", {**VAL_WNIDS, 5: "n09999999"})
    with pytest.raises(PipelineError, match=f"image {image_id(5)} has class n09999999"):
        shards_stage.run(flat_val_config(imagenet, truth, imagenet / "out"))


def test_image_without_label(imagenet):
    write_image(imagenet / "val" / f"{image_id(9)}.JPEG", seed=9)
    write_image(imagenet / "val" / f"{image_id(10)}.JPEG", seed=10)
    for labels in (loc(imagenet), devkit(imagenet)):
        with pytest.raises(PipelineError) as error:
            shards_stage.run(flat_val_config(imagenet, labels, imagenet / "out"))
        assert str(error.value) == (f"{imagenet / 'val' / image_id(9)}.JPEG (and 1 more): no label in {labels} "
                                    "(option --val-labels)")


def test_ground_truth_without_meta_mat(imagenet):
    truth = imagenet / "elsewhere" / "ILSVRC2012_validation_ground_truth.txt"
    truth.parent.mkdir()
    truth.write_bytes(devkit(imagenet).read_bytes())
    with pytest.raises(PipelineError) as error:
        shards_stage.run(flat_val_config(imagenet, truth, imagenet / "out"))
    assert str(error.value) == (f"{truth.parent / 'meta.mat'}: not found; ILSVRC2012_validation_ground_truth.txt "
                                "needs the devkit's meta.mat beside it (ILSVRC2012_devkit_t12/data/) to map "
                                "class ids to wnids")


def test_format_is_told_by_content_not_extension(imagenet):
    renamed = imagenet / "labels.dat"
    renamed.write_bytes(loc(imagenet).read_bytes())
    shards_stage.run(flat_val_config(imagenet, renamed, imagenet / "out"))
    assert sorted(val_labels_of(imagenet / "out").values()) == [0, 0, 1, 1, 2, 2]
    unknown = imagenet / "synset_words.txt"
    unknown.write_text("n01440764 tench, Tinca tinca\n")
    with pytest.raises(PipelineError, match="synset_words.txt: not an ImageNet val labels file"):
        shards_stage.run(flat_val_config(imagenet, unknown, imagenet / "out"))


def test_flat_folder_without_val_labels_says_what_to_pass(imagenet):
    with pytest.raises(PipelineError) as error:
        shards_stage.run(flat_val_config(imagenet, "", imagenet / "out"))
    assert str(error.value) == (
        f"{imagenet / 'val'}: no class folders; expected the layout <root>/<class>/<image> (option --val-root); "
        "for ImageNet's flat val folder pass --val-labels LOC_val_solution.csv or "
        "ILSVRC2012_validation_ground_truth.txt"
    )


def test_cli_reports_an_unlabelled_image_in_one_line(imagenet):
    write_image(imagenet / "val" / f"{image_id(9)}.JPEG", seed=9)
    line = one_line_error(cli("shards", "--source", "folder", "--root", str(imagenet / "train"),
                              "--val-root", str(imagenet / "val"), "--val-labels", str(loc(imagenet)),
                              "--out", str(imagenet / "out"), "--workers", "1"))
    assert line.endswith(f"{imagenet / 'val' / image_id(9)}.JPEG: no label in {loc(imagenet)} (option --val-labels)")
