"""python -m sdca_dist.shard: byte-exact labels, manifest, atomic + resumable packing, every bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import TINY
from PIL import Image

from sdca_dist import shard as shard_cli
from sdca_dist.data.layouts import list_pairs, read_label
from sdca_dist.data.shard_set import ShardReader, ShardWriter, load_manifest, write_manifest


def test_manifest_and_labels_byte_exact(shard_sets, synth_root):
    for name, layout, split in (
        ("gta5", "gta5", "train"),
        ("synthia", "synthia", "train"),
        ("cityscapes_val", "cityscapes", "val"),
    ):
        m = load_manifest(shard_sets[name])
        pairs = list_pairs(layout, synth_root / layout, split)
        assert m.num_samples == len(pairs) == sum(s["count"] for s in m.shards)
        assert m.num_classes == (16 if layout == "synthia" else 19)
        reader = ShardReader(m)
        pixels = np.zeros(m.num_classes, np.int64)
        for i, pair in enumerate(pairs):
            s = reader.read(i)
            want, _ = read_label(layout, pair.label)
            got = Image.open(io.BytesIO(s["label"]))
            assert got.mode == "L" and np.array_equal(np.asarray(got), want)
            assert s["meta"]["path"] == pair.rel and s["meta"]["size"] == list(Image.open(pair.image).size)
            present = sorted(int(c) for c in np.unique(want) if c < m.num_classes)
            assert s["meta"]["classes"] == m.samples[i]["classes"] == present
            pixels += np.bincount(want.ravel(), minlength=256)[: m.num_classes]
            # Cityscapes-layout sets are lossless by default, the synthetic sources JPEG
            assert Image.open(io.BytesIO(s["image"])).format == ("PNG" if layout == "cityscapes" else "JPEG")
        assert m.class_pixels == pixels.tolist()
    assert len(load_manifest(shard_sets["gta5"]).shards) >= 3  # the small shard size really cut shards


def test_dali_index_matches_wds2idx(shard_sets, tmp_path):
    from wds2idx import IndexCreator

    m = load_manifest(shard_sets["gta5"])
    for tar, idx in zip(m.shard_paths(), [m.folder / s["index"] for s in m.shards]):
        c = IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False)
        c.open()
        c.create_index()
        c.close()
        assert (tmp_path / "ref.idx").read_text() == idx.read_text()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _run(argv, capsys) -> tuple[int, str]:
    rc = shard_cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err.strip().splitlines()[-1] if cap.err.strip() else ""


def test_interrupted_run_resumes_to_identical_bytes(synth_root, tmp_path, capsys):
    root = tmp_path / "gta5"
    shutil.copytree(synth_root / "gta5", root)
    args = ["--layout", "gta5", "--root", root, "--shard-size", "12000", "--workers", "2", "--quiet"]
    assert _run(args + ["--out", tmp_path / "clean"], capsys)[0] == 0
    clean = _files(tmp_path / "clean")
    # the 9th image is truncated: the run stops with one line, keeps only complete shards
    victim = root / "images" / "00009.png"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    rc, line = _run(args + ["--out", tmp_path / "resumed"], capsys)
    assert rc == 2 and "00009.png" in line and "truncated" in line
    partial = _files(tmp_path / "resumed")
    assert "manifest.json" not in partial and not any(n.startswith(".tmp") for n in partial)
    assert 0 < sum(n.endswith(".tar") for n in partial) < sum(n.endswith(".tar") for n in clean)
    for n, data in partial.items():
        assert clean[n] == data  # complete shards are final
    victim.write_bytes(good)
    (tmp_path / "resumed" / ".tmp-shard-000009.tar").write_bytes(b"half")  # a crash leftover
    assert _run(args + ["--out", tmp_path / "resumed", "--verify"], capsys)[0] == 0
    assert _files(tmp_path / "resumed") == clean


def test_verify_reports_a_corrupted_shard(synth_root, tmp_path, capsys):
    out = tmp_path / "v"
    args = ["--layout", "cityscapes", "--split", "val", "--root", synth_root / "cityscapes", "--out", out, "--quiet"]
    assert _run(args, capsys)[0] == 0
    tar = out / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    from sdca_dist.data.packing import verify

    problems = verify(out / "manifest.json")
    assert len(problems) == 1 and "shard-000000.tar: sha256" in problems[0]


def _bad_copy(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    shutil.copytree(synth_root / "gta5", root)
    return root


@pytest.mark.parametrize(
    "case", ["unreadable", "truncated", "no_label", "no_image", "mismatch", "unknown_ids", "empty", "missing"]
)
def test_bad_inputs_fail_with_one_line_naming_the_file(case, synth_root, tmp_path, capsys):
    root = _bad_copy(synth_root, tmp_path)
    out = tmp_path / "out"
    expect = {
        "unreadable": ("images/00003.png", "unreadable"),
        "truncated": ("images/00003.png", "truncated"),
        "no_label": ("images/00003.png", "image without label"),
        "no_image": ("labels/00003.png", "label without image"),
        "mismatch": ("images/00003.png", "size mismatch"),
        "unknown_ids": ("labels/00003.png", "ids outside the gta5 table"),
        "empty": ("images", "input folder is empty"),
        "missing": ("images", "input folder is missing"),
    }[case]
    if case == "unreadable":
        (root / "images/00003.png").write_bytes(b"not a png at all")
    elif case == "truncated":
        p = root / "images/00003.png"
        p.write_bytes(p.read_bytes()[:300])
    elif case == "no_label":
        (root / "labels/00003.png").unlink()
    elif case == "no_image":
        (root / "images/00003.png").unlink()
    elif case == "mismatch":
        Image.open(root / "images/00003.png").resize((40, 30)).save(root / "images/00003.png")
    elif case == "unknown_ids":
        im = Image.open(root / "labels/00003.png")
        a = np.asarray(im).copy()
        a[0, :5] = 250
        im2 = Image.fromarray(a, mode="P")
        im2.putpalette(im.getpalette())
        im2.save(root / "labels/00003.png")
    elif case == "empty":
        shutil.rmtree(root / "images")
        (root / "images").mkdir()
    elif case == "missing":
        shutil.rmtree(root / "images")
    rc, line = _run(["--layout", "gta5", "--root", root, "--out", out, "--shard-size", "12000", "--quiet"], capsys)
    assert rc == 2
    assert line.startswith("error: ") and expect[0] in line and expect[1] in line, line
    assert "manifest.json" not in [p.name for p in out.glob("*")]
    assert not list(out.glob(".tmp*"))
    if case == "mismatch":  # the flag skips such pairs and lists them in the manifest
        rc, _ = _run(
            ["--layout", "gta5", "--root", root, "--out", out, "--shard-size", "12000", "--quiet", "--skip-mismatched"],
            capsys,
        )
        m = load_manifest(out)
        assert rc == 0 and m.num_samples == TINY.num_source - 1
        assert [s["path"] for s in m.skipped] == ["images/00003.png"] and "40x30" in m.skipped[0]["reason"]
    if case == "unknown_ids":
        rc, _ = _run(["--layout", "gta5", "--root", root, "--out", out, "--quiet", "--unknown-ids", "ignore"], capsys)
        m = load_manifest(out)
        assert rc == 0 and m.info["unknown_ids"] == [{"path": "labels/00003.png", "pixels": 5}]


def test_shard_writer_parts_combine_into_one_manifest(tmp_path):
    """Pseudo-label stage: each rank writes its part from encoded bytes; rank 0 combines."""
    rng = np.random.default_rng(0)
    labels = {}
    for r in range(2):
        w = ShardWriter(tmp_path, prefix=f"part-r{r}", shard_size=3000, num_classes=19)
        for i in range(5):
            key = f"r{r}_{i}"
            labels[key] = rng.integers(0, 19, size=(6, 8)).astype(np.uint8)
            w.add(key, b"\xff\xd8fakejpeg" + bytes([i]), "jpg", labels[key], {"path": f"{key}.png"})
        w.close()
    m = write_manifest(tmp_path, None, 19)  # None: read every complete part's sidecar
    assert m.num_samples == 10 and [s["name"].split("-")[1] for s in m.shards][0] == "r0"
    reader = ShardReader(tmp_path / "manifest.json")
    for i in range(10):
        s = reader.read(i)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["label"]))), labels[s["key"]])
        assert s["meta"]["path"] == f"{s['key']}.png" and s["image"].startswith(b"\xff\xd8fake")
    assert m.class_pixels == np.bincount(np.concatenate([l.ravel() for l in labels.values()]), minlength=19).tolist()


def test_missing_or_corrupt_manifest_is_one_line(tmp_path):
    from sdca_dist.data.errors import DataError

    with pytest.raises(DataError, match="manifest.json: manifest does not exist"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "nope"}))
    with pytest.raises(DataError, match="manifest.json: corrupt manifest"):
        load_manifest(tmp_path / "manifest.json")


def test_cityscapes_val_is_pixel_exact_through_the_loader(shard_sets, synth_root):
    """Evaluation sees the dataset's own pixels (PNG in the tar, DALI decode, no resize)."""
    import torch

    from sdca_dist.data.loader import IMAGENET_MEAN, IMAGENET_STD, ShardLoader

    m = load_manifest(shard_sets["cityscapes_val"])
    assert m.info["options"]["image_format"] == "png" and {s["image_ext"] for s in m.samples} == {"img.png"}
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    reader = ShardReader(m)
    seen = 0
    for b in ShardLoader(m, 4, train=False, device="cpu", num_threads=1):
        for j in range(4):
            if not b["valid"][j]:
                continue
            rec = m.samples[int(b["index"][j])]
            source = synth_root / "cityscapes" / reader.read(int(b["index"][j]))["meta"]["path"]
            want = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32)
            h, w = rec["size"][1], rec["size"][0]
            got = (b["image"][j] * std + mean)[:, :h, :w].permute(1, 2, 0).numpy()
            assert np.abs(got - want).max() < 1e-3  # float normalisation round trip only
            seen += 1
    assert seen == m.num_samples
