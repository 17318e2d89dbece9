"""The benchmark layouts (ACDC, Dark Zurich, BDD100K, Mapillary Vistas), a user's own folders with a
classes file, and unlabelled splits: label-exact through the shards, and every refusal in one line."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from layout_trees import (
    FIVE_CLASSES,
    acdc_tree,
    bdd100k_tree,
    dark_zurich_tree,
    folder_tree,
    mapillary_tree,
)
from PIL import Image

from sdca_dist import shard as shard_cli
from sdca_dist.classes import ClassesError, load_classes
from sdca_dist.data.errors import DataError, UsageError
from sdca_dist.data.packing import PackOptions, pack
from sdca_dist.data.shard_set import ShardReader, load_manifest


def _pack(tmp_path, layout, root, split, **kw):
    opts = PackOptions(
        layout=layout, root=root, out=tmp_path / f"{layout}_{split}", split=split, workers=1, progress=False, **kw
    )
    return pack(opts)


def _check_exact(m, root, want: dict, lossless: bool) -> None:
    """Every sample's label equals the expected trainIds (all ignore when unlabelled), and its image the source."""
    reader = ShardReader(m)
    got = {}
    for i in range(m.num_samples):
        s = reader.read(i)
        got[s["meta"]["path"]] = s
    assert sorted(got) == sorted(want)
    for rel, expected in want.items():
        s = got[rel]
        label = np.asarray(Image.open(io.BytesIO(s["label"])))
        source = np.asarray(Image.open(root / rel).convert("RGB"))
        if expected is None:
            assert (label == 255).all() and label.shape == source.shape[:2]
        else:
            assert np.array_equal(label, expected), rel
        image = Image.open(io.BytesIO(s["image"]))
        assert image.format == ("PNG" if lossless else "JPEG")
        if lossless:
            assert np.array_equal(np.asarray(image.convert("RGB")), source)


def test_acdc_label_ids_through_shards_and_condition_filter(tmp_path):
    root = tmp_path / "acdc"
    want = acdc_tree(root)
    m = _pack(tmp_path, "acdc", root, "train")
    train = {k: v for k, v in want.items() if "/train/" in k}
    assert m.num_samples == 4 and m.num_classes == 19 and "labelled" not in m.info
    _check_exact(m, root, train, lossless=True)
    night = _pack(tmp_path / "n", "acdc", root, "train", conditions=("night",))
    assert [r["key"] for r in night.samples] == ["night_GOPR0351_frame_000000", "night_GOPR0351_frame_000001"]
    assert night.info["options"]["conditions"] == ["night"]
    val = _pack(tmp_path, "acdc", root, "val")
    _check_exact(val, root, {k: v for k, v in want.items() if "/val/" in k}, lossless=True)
    with pytest.raises(UsageError, match=r"--condition: is not a condition of acdc \(fog, night, rain, snow\)"):
        PackOptions(layout="acdc", root=root, out=tmp_path / "x", conditions=("day",))


def test_dark_zurich_unlabelled_train_and_labelled_val(tmp_path):
    root = tmp_path / "dz"
    want = dark_zurich_tree(root)
    night = _pack(tmp_path, "dark_zurich", root, "train", conditions=("night",))
    assert night.num_samples == 3 and night.info["labelled"] is False
    _check_exact(night, root, {k: v for k, v in want.items() if "/train/night/" in k}, lossless=True)
    assert all(not r["classes"] for r in night.samples) and sum(night.class_pixels) == 0
    every = _pack(tmp_path / "all", "dark_zurich", root, "train")
    assert every.num_samples == 6
    val = _pack(tmp_path, "dark_zurich", root, "val")
    assert "labelled" not in val.info
    _check_exact(val, root, {k: v for k, v in want.items() if "/val/" in k}, lossless=True)


def test_bdd100k_masks_are_train_ids_and_unknown_ids_are_refused(tmp_path):
    root = tmp_path / "bdd"
    want = bdd100k_tree(root)
    m = _pack(tmp_path, "bdd100k", root, "train")
    _check_exact(m, root, {k: v for k, v in want.items() if "/train/" in k}, lossless=False)
    bad = sorted((root / "labels" / "sem_seg" / "masks" / "val").glob("*.png"))[0]
    Image.fromarray(np.array([[0, 19], [40, 255]], np.uint8).repeat(12, 0).repeat(20, 1), mode="L").save(bad)
    with pytest.raises(DataError, match=rf"{bad.name}: 480 pixels with ids outside the bdd100k table \(ids 19, 40\)"):
        _pack(tmp_path, "bdd100k", root, "val")


@pytest.mark.parametrize("v12_folder", [False, True])
def test_mapillary_ids_map_onto_the_19_classes(tmp_path, v12_folder):
    root = tmp_path / "mapillary"
    want = mapillary_tree(root, v12_folder=v12_folder)
    m = _pack(tmp_path, "mapillary", root, "train")
    assert m.num_classes == 19
    _check_exact(m, root, {k: v for k, v in want.items() if k.startswith("training/")}, lossless=False)
    val = _pack(tmp_path, "mapillary", root, "val", image_format="png")
    _check_exact(val, root, {k: v for k, v in want.items() if k.startswith("validation/")}, lossless=True)


def test_folder_layout_with_a_classes_file(tmp_path):
    root, classes = tmp_path / "mine", tmp_path / "classes.yaml"
    classes.write_text(FIVE_CLASSES)
    want = folder_tree(root, "day", 5)
    m = _pack(tmp_path, "folder", root, "day", classes=classes)
    assert m.num_classes == 5 and m.info["split"] == "day"
    assert [c["name"] for c in m.info["options"]["classes"]["classes"]] == [
        "road",
        "sidewalk",
        "building",
        "nature",
        "vehicle",
    ]
    _check_exact(m, root, want, lossless=True)
    assert max(max(r["classes"], default=0) for r in m.samples) == 4
    # a target split without labels/<split>: unlabelled
    folder_tree(root, "night", 3, seed=1, labelled=False)
    night = _pack(tmp_path, "folder", root, "night", classes=classes)
    assert night.info["labelled"] is False and night.num_samples == 3


def test_folder_layout_refuses_unknown_values_and_unpaired_files(tmp_path):
    root, classes = tmp_path / "mine", tmp_path / "classes.yaml"
    classes.write_text(FIVE_CLASSES)
    folder_tree(root, "train", 3)
    bad = root / "labels" / "train" / "cam1" / "img.001.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[0, :3] = [7, 7, 200]
    Image.fromarray(arr, mode="L").save(bad)
    with pytest.raises(DataError) as info:
        _pack(tmp_path, "folder", root, "train", classes=classes)
    assert str(info.value) == (
        f"{bad}: 3 pixels with ids outside the classes file {classes} (ids 7, 200); "
        "rerun with --unknown-ids ignore to map them to 255 (the same --out continues)"
    )
    bad.unlink()
    with pytest.raises(DataError, match=r"img\.001\.jpg: image without label"):
        _pack(tmp_path / "b", "folder", root, "train", classes=classes)
    with pytest.raises(UsageError, match="--classes: the folder layout needs --classes FILE"):
        PackOptions(layout="folder", root=root, out=tmp_path / "x")
    with pytest.raises(UsageError, match="--classes: is for --layout folder only"):
        PackOptions(layout="gta5", root=root, out=tmp_path / "x", classes=classes)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("classes: [", "not valid YAML at line 1 (expected the node content"),
        ("names: [a, b]", "expected a mapping with a 'classes' list (and optionally 'ignore')"),
        ("classes: []", "'classes' must be a non-empty list"),
        ("classes:\n  - {name: a, color: [1, 2]}", "class 0 (a): 'color' must be [R, G, B], got [1, 2]"),
        ("classes:\n  - {name: a, color: [1, 2, 300]}", "class 0 (a): 'color' must lie in 0..255"),
        ("classes:\n  - {name: '', color: [1, 2, 3]}", "class 0: 'name' must be a non-empty string, got ''"),
        (
            "classes:\n  - {name: a, color: [1, 2, 3], values: [1]}\n  - {name: a, color: [1, 2, 3], values: [2]}",
            "class 1 (a): the name is used twice",
        ),
        (
            "classes:\n  - {name: a, color: [1, 2, 3], values: [1, 2]}\n  - {name: b, color: [1, 2, 3], values: [2]}",
            "class 1 (b): label value 2 is already taken by a",
        ),
        (
            "classes:\n  - {name: a, color: [1, 2, 3], values: [0]}\nignore: [0]",
            "label value 0 is already taken by ignore",
        ),
        ("classes:\n  - {name: a, color: [1, 2, 3], values: [1.5]}", "'values' must be a list of integers, got [1.5]"),
        ("classes:\n  - {name: a, colour: [1, 2, 3]}", "class 0: unknown key(s) colour (expected name, color, values)"),
        (
            "classes:\n  - {name: a, color: [1, 2, 3]}\nignored: [0]",
            "unknown key(s) ignored (expected classes, ignore)",
        ),
    ],
)
def test_malformed_classes_files_are_refused_in_one_line(tmp_path, text, problem):
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(ClassesError) as info:
        load_classes(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg


def test_classes_file_values_default_to_the_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classes:\n  - {name: a, color: [1, 2, 3]}\n  - {name: b, color: [4, 5, 6]}\n")
    t = load_classes(path)
    assert t.values == ((0,), (1,)) and t.ignore == () and t.value_lut()[:3].tolist() == [0, 1, 255]


def test_shard_cli_refuses_a_bad_classes_file_in_one_line(tmp_path, capsys):
    root = tmp_path / "mine"
    folder_tree(root, "train", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  - {name: road, color: [128, 64]}\n")
    argv = ["--layout", "folder", "--root", str(root), "--split", "train", "--out", str(tmp_path / "o")]
    rc = shard_cli.main([*argv, "--classes", str(bad), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: --classes: {bad}: class 0 (road): 'color' must be [R, G, B], got [128, 64]"
    assert not (tmp_path / "o").exists()
    rc = shard_cli.main([*argv, "--quiet"])
    assert rc == 2 and capsys.readouterr().err.strip() == "error: --classes: the folder layout needs --classes FILE"


def test_data_classes_sets_the_class_count_and_refuses_a_bad_file(tmp_path):
    from sdca_dist.config import ConfigError, compose_config

    good = tmp_path / "classes.yaml"
    good.write_text(FIVE_CLASSES)
    cfg = compose_config(["conf=folder", f"data.classes={good}"])
    assert cfg.data.num_classes == 5 and cfg.data.classes == str(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: 3\n")
    with pytest.raises(ConfigError) as info:
        compose_config(["conf=folder", f"data.classes={bad}"])
    assert str(info.value) == f"data.classes={bad}: {bad}: 'classes' must be a non-empty list"
    with pytest.raises(ConfigError, match="data.classes=.*missing.yaml: cannot read the classes file"):
        compose_config(["conf=folder", f"data.classes={tmp_path / 'missing.yaml'}"])


def test_stage_key_follows_the_classes_file_content(tmp_path):
    from sdca_dist.config import compose_config
    from sdca_dist.stage_keys import settings_key

    path = tmp_path / "classes.yaml"
    path.write_text(FIVE_CLASSES)
    cfg = compose_config(["conf=folder", f"data.classes={path}"])
    before = settings_key(cfg, "eval")
    path.write_text(FIVE_CLASSES.replace("vehicle", "car"))
    assert settings_key(cfg, "eval") != before


def test_manifest_records_labelled_only_when_false(tmp_path):
    root = tmp_path / "dz"
    dark_zurich_tree(root)
    m = _pack(tmp_path, "dark_zurich", root, "train", conditions=("day",))
    assert json.loads(m.path.read_text())["info"]["labelled"] is False
    assert load_manifest(m.path).info["labelled"] is False


def test_a_run_refuses_folder_shards_of_other_classes(tmp_path):
    from sdca_dist.config import compose_config
    from sdca_dist.engine.data import DataConfigError, check_classes

    root, classes = tmp_path / "mine", tmp_path / "classes.yaml"
    classes.write_text(FIVE_CLASSES)
    folder_tree(root, "val", 2)
    m = _pack(tmp_path, "folder", root, "val", classes=classes)
    check_classes(compose_config(["conf=folder", f"data.classes={classes}"]), m.path)  # the same classes
    other = tmp_path / "other.yaml"
    other.write_text(FIVE_CLASSES.replace("vehicle", "car"))
    with pytest.raises(DataConfigError, match=r"packed with classes \[.*'vehicle'\], data.classes=.*other.yaml has"):
        check_classes(compose_config(["conf=folder", f"data.classes={other}"]), m.path)
    with pytest.raises(DataConfigError, match=r"packed with a classes file \(5 classes: road, sidewalk,"):
        check_classes(compose_config(["conf=gta2city"]), m.path)


def test_predictions_of_a_classes_file_use_its_values_and_colours(tmp_path):
    from sdca_dist.classes import colorize
    from sdca_dist.predict import class_value_table

    path = tmp_path / "classes.yaml"
    path.write_text(FIVE_CLASSES)
    table = load_classes(path)
    pred = np.array([[0, 3], [4, 255]], np.uint8)
    assert class_value_table(table)[pred].tolist() == [[1, 9], [14, 0]]
    assert colorize(pred, 5, table.palette()).tolist() == [[[128, 64, 128], [107, 142, 35]], [[0, 0, 142], [0, 0, 0]]]
