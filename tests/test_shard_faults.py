"""Fault injection on python -m sdca_dist.shard: kill -9, no space, flipped bytes, foreign
shards, resumed manifests, every bad option. Real processes, real tmpfs mounts, real tars."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fault_fixtures import tmpfs
from PIL import Image

from sdca_dist import shard as shard_cli
from sdca_dist.data.errors import DataError
from sdca_dist.data.layouts import read_label
from sdca_dist.data.shard_set import load_manifest
from sdca_dist.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
RAW = SynthConfig(
    seed=5, num_source=40, num_target_train=0, num_target_val=0, source_size=(160, 96), synthia_size=(16, 8)
)
BUILD = ["--layout", "gta5", "--shard-size", "40k", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    """Two GTA5-style sets with the same file names and different pixels (a regenerated dataset)."""
    base = tmp_path_factory.mktemp("raw")
    generate(base / "a", RAW)
    generate(base / "b", SynthConfig(**{**RAW.__dict__, "seed": 6}))
    return {"a": base / "a" / "gta5", "b": base / "b" / "gta5"}


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("clean") / "set"
    assert shard_cli.main([*map(str, BUILD), "--root", str(raw["a"]), "--out", str(out)]) == 0
    return _files(out)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        rc = shard_cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.err.strip().splitlines()


# ------------------------------------------------------------------------------------------ crashes


def test_kill_9_at_random_points_then_rerun_gives_identical_bytes(raw, clean, tmp_path, capsys):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sdca_dist.shard", *BUILD, "--root", str(raw["a"]), "--out", str(out)]
    rng = random.Random(14)
    kills = 0
    for trial in range(6):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # half the kills land the moment a temp file exists (mid-shard or mid-sidecar), half at a
        # random number of complete shards
        want = rng.randint(1, 7)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            names = os.listdir(out) if out.is_dir() else []
            if (trial % 2 == 0 and any(n.startswith(".tmp-") for n in names)) or (
                trial % 2 == 1 and sum(n.endswith(".tar") for n in names) >= want
            ):
                time.sleep(rng.random() * 0.01)
                break
            time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3  # most trials really were cut short
    assert _run([*BUILD, "--root", raw["a"], "--out", out, "--verify"], capsys)[0] == 0
    assert _files(out) == clean


def test_no_space_left_is_one_line_and_leaves_no_temp_file(raw, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "48k") as mnt:
        out = mnt / "set"
        rc, err = _run([*BUILD, "--root", raw["a"], "--out", out], capsys)
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {out}") and "No space left on device" in err[0], err
        left = os.listdir(out) if out.exists() else []  # an --out the build created and left empty is removed
        assert not [n for n in left if n.startswith(".tmp")] and "manifest.json" not in left
        for name in left:  # every file that remains is complete: a sidecar always has its tar
            if name.endswith(".tar.json"):
                assert name[: -len(".json")] in left


def test_no_space_at_any_step_of_finishing_a_shard_leaves_no_temp_file(tmp_path):
    """The disk fills while a shard is finished: writing the tar's end, its DALI index, its
    sidecar (the tar complete under its temp name). Each step in turn gets no space (a filler
    file leaves 0, 1, 2, ... free pages of a small tmpfs); every failure is OutputError naming
    the file, and no ``.tmp-*`` file stays."""
    from sdca_dist.data.errors import OutputError
    from sdca_dist.data.shard_set import ShardWriter

    rng = np.random.default_rng(0)
    samples = [(rng.bytes(20000), rng.integers(0, 19, size=(16, 16)).astype(np.uint8)) for _ in range(3)]
    failed_at = []
    for free_pages in range(6):
        with tmpfs(tmp_path / f"small{free_pages}", "256k") as mnt:
            out = mnt / "set"
            writer = ShardWriter(out, shard_size="1GB", num_classes=19)
            for i, (image, label) in enumerate(samples):
                writer.add(f"s{i}", image, "jpg", label, {"path": f"{i}.png"})
            with open(mnt / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(bytes(4096))
                except OSError:
                    pass
                f.truncate(max(0, f.tell() - free_pages * 4096))
            try:
                writer.close()
            except OutputError as e:
                failed_at.append(Path(str(e).split(":")[0]).suffix)
            left = sorted(os.listdir(out))
            assert not [n for n in left if n.startswith(".tmp")], (free_pages, left)
            assert left in ([], ["shard-000000.idx", "shard-000000.tar", "shard-000000.tar.json"]), left
    assert {".tar", ".idx", ".json"} <= set(failed_at), failed_at  # each step really ran out of space


def test_a_stopped_build_leaves_no_temp_file_and_resumes(raw, clean, tmp_path, capsys):
    """SIGTERM (``kill``), SIGINT (Ctrl-C) or SIGHUP mid-shard: one line, exit 128+N, the
    incomplete shard's temp file removed; the rerun gives the clean build's bytes."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "sdca_dist.shard", *BUILD, "--root", str(raw["a"]), "--out", str(out)]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if out.is_dir() and any(n.startswith(".tmp-shard") for n in os.listdir(out)):
                break
            time.sleep(0.0005)
        assert proc.poll() is None, "the build ended before a temp shard was seen"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        name = signal.Signals(signum).name
        assert proc.returncode == 128 + signum, (name, err[-2000:])
        assert err.strip().splitlines()[-1] == (
            f"error: stopped by {name}; no incomplete shard left in {out}; rerun to resume"
        )
        left = os.listdir(out) if out.exists() else []  # an --out the build created and left empty is removed
        assert not [n for n in left if n.startswith(".tmp")], (name, left)
    assert _run([*BUILD, "--root", raw["a"], "--out", out], capsys)[0] == 0
    assert _files(out) == clean


def test_read_only_out_file_out_and_file_parent_are_one_line(raw, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {afile: "is a file", afile / "sub": "not a folder"}
    with tmpfs(tmp_path / "ro", "16k", read_only=True) as ro:
        cases[ro / "set"] = "Read-only file system"
        cases[ro] = "Read-only file system"
        for out, what in cases.items():
            rc, err = _run([*BUILD, "--root", raw["a"], "--out", out], capsys)
            assert rc == 2 and len(err) == 1 and str(out) in err[0] and what in err[0], (out, err)


# ------------------------------------------------------------------------------------------ verify / repair


def test_flipped_bytes_are_found_without_raw_data_and_repaired_exactly(raw, clean, tmp_path, capsys):
    out = tmp_path / "set"
    out.mkdir()
    for name, data in clean.items():
        (out / name).write_bytes(data)
    tar1 = out / "shard-000001.tar"
    data = bytearray(tar1.read_bytes())
    data[700] ^= 0x40
    tar1.write_bytes(bytes(data))
    (out / "shard-000004.idx").unlink()
    (out / "shard-000006.tar").write_bytes(b"")
    rc, err = _run(["--verify", "--out", out], capsys)  # no --root: the raw data is not needed
    assert rc == 1
    assert any("shard-000001.tar: sha256" in e for e in err) and any("shard-000004.idx" in e for e in err)
    assert any("shard-000006.tar" in e for e in err) and "--repair" in err[-1]
    rc, _ = _run(["--repair", "--root", raw["a"], "--out", out, "--workers", "1"], capsys)
    assert rc == 0
    assert _files(out) == clean
    # repair refuses to install a shard that the (changed) raw data no longer reproduces
    data = bytearray(tar1.read_bytes())
    data[700] ^= 0x40
    tar1.write_bytes(bytes(data))
    rc, err = _run(["--repair", "--root", raw["b"], "--out", out, "--workers", "1"], capsys)
    assert rc == 2 and "no longer gives the bytes of shard-000001.tar" in err[-1] and "--overwrite" in err[-1]
    assert tar1.read_bytes() == bytes(data) and not list(out.glob(".tmp*"))


# ------------------------------------------------------------------------------------------ provenance


def _interrupted_copy(clean: dict[str, bytes], out: Path, keep_shards: int) -> None:
    """The folder a crash after ``keep_shards`` complete shards leaves behind."""
    out.mkdir(parents=True)
    for name, data in clean.items():
        if name != "manifest.json" and int(name.split("-")[1].split(".")[0]) < keep_shards:
            (out / name).write_bytes(data)


def test_foreign_shards_are_refused_and_rebuilt_only_on_request(raw, clean, tmp_path, capsys):
    out = tmp_path / "set"
    _interrupted_copy(clean, out, 3)
    before = _files(out)
    # regenerated raw data (same names, other pixels) into the same folder: refused, nothing written
    rc, err = _run([*BUILD, "--root", raw["b"], "--out", out], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {out}: holds shards of other data"), err
    assert "--overwrite" in err[0] and _files(out) == before
    # an explicit rebuild gives exactly the fresh build of the new data
    assert _run([*BUILD, "--root", raw["b"], "--out", out, "--overwrite"], capsys)[0] == 0
    fresh = tmp_path / "fresh"
    assert _run([*BUILD, "--root", raw["b"], "--out", fresh], capsys)[0] == 0
    assert _files(out) == _files(fresh)
    # other options are refused too, naming the option and both ways out
    rc, err = _run([*BUILD, "--root", raw["b"], "--out", out, "--jpeg-quality", "80"], capsys)
    assert rc == 2 and "jpeg_quality 90 -> 80" in err[0] and "new --out" in err[0] and "--overwrite" in err[0]
    # a different root with identical content is the same data: it resumes
    moved = tmp_path / "moved"
    shutil.copytree(raw["a"], moved)
    out2 = tmp_path / "set2"
    _interrupted_copy(clean, out2, 3)
    assert _run([*BUILD, "--root", moved, "--out", out2], capsys)[0] == 0
    assert {k: v for k, v in _files(out2).items() if k != "manifest.json"} == {
        k: v for k, v in clean.items() if k != "manifest.json"
    }
    assert (
        load_manifest(out2).info["source"]["sha256"] == json.loads(clean["manifest.json"])["info"]["source"]["sha256"]
    )


def test_manifest_after_resume_lists_skips_once_and_keeps_unknown_ids(raw, tmp_path, capsys):
    root = tmp_path / "raw"
    shutil.copytree(raw["a"], root)
    Image.open(root / "images/00004.png").resize((40, 30)).save(root / "images/00004.png")  # skipped
    for stem in ("00003", "00031"):  # unknown ids early (inside a kept shard) and late
        im = Image.open(root / f"labels/{stem}.png")
        a = np.asarray(im).copy()
        a[0, :7] = 250
        im2 = Image.fromarray(a, mode="P")
        im2.putpalette(im.getpalette())
        im2.save(root / f"labels/{stem}.png")
    args = [*BUILD, "--root", root, "--skip-mismatched", "--unknown-ids", "ignore"]
    assert _run([*args, "--out", tmp_path / "clean"], capsys)[0] == 0
    clean = _files(tmp_path / "clean")
    m = load_manifest(tmp_path / "clean")
    assert [s["path"] for s in m.skipped] == ["images/00004.png"]
    assert m.info["unknown_ids"] == [
        {"path": "labels/00003.png", "pixels": 7},
        {"path": "labels/00031.png", "pixels": 7},
    ]
    for keep in (1, 3):
        out = tmp_path / f"resumed{keep}"
        _interrupted_copy(clean, out, keep)
        assert _run([*args, "--out", out], capsys)[0] == 0
        assert _files(out) == clean  # manifest included: skips once, unknown ids and options kept


def test_unknown_ids_hint_continues_in_the_same_folder(raw, tmp_path, capsys):
    root = tmp_path / "raw"
    shutil.copytree(raw["a"], root)
    im = Image.open(root / "labels/00030.png")  # late: complete shards exist when the error stops the run
    a = np.asarray(im).copy()
    a[0, :3] = 250
    im2 = Image.fromarray(a, mode="P")
    im2.putpalette(im.getpalette())
    im2.save(root / "labels/00030.png")
    out = tmp_path / "set"
    rc, err = _run([*BUILD, "--root", root, "--out", out], capsys)
    assert rc == 2 and "--unknown-ids ignore" in err[-1] and len(list(out.glob("*.tar"))) >= 2
    rc, err = _run([*BUILD, "--root", root, "--out", out, "--unknown-ids", "ignore"], capsys)  # the hint, verbatim
    assert rc == 0, err
    fresh = tmp_path / "fresh"
    assert _run([*BUILD, "--root", root, "--out", fresh, "--unknown-ids", "ignore"], capsys)[0] == 0
    assert {k: v for k, v in _files(out).items() if k.endswith(".tar")} == {
        k: v for k, v in _files(fresh).items() if k.endswith(".tar")
    }
    assert load_manifest(out).info["unknown_ids"] == [{"path": "labels/00030.png", "pixels": 3}]


# ------------------------------------------------------------------------------------------ strict inputs


@pytest.mark.parametrize(
    "extra,option,what",
    [
        (["--shard-size", "-5"], "--shard-size", "at least 1 byte"),
        (["--shard-size", "0"], "--shard-size", "at least 1 byte"),
        (["--shard-size", "abc"], "--shard-size", "not a size"),
        (["--shard-size", "nanGB"], "--shard-size", "not a size"),
        (["--jpeg-quality", "500"], "--jpeg-quality", "between 1 and 100"),
        (["--jpeg-quality", "0"], "--jpeg-quality", "between 1 and 100"),
        (["--jpeg-quality", "high"], "--jpeg-quality", "not an integer"),
        (["--workers", "0"], "--workers", "between 1 and 1024"),
        (["--workers", "two"], "--workers", "not an integer"),
        (["--image-format", "gif"], "--image-format", "invalid choice"),
        (["--unknown-ids", "maybe"], "--unknown-ids", "invalid choice"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(extra, option, what, raw, tmp_path, capsys):
    out = tmp_path / "set"
    argv = ["--layout", "gta5", "--root", raw["a"], "--out", out, "--quiet", *extra]
    rc, err = _run(argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and option in err[0] and what in err[0], err
    assert not out.exists()


def test_empty_dataset_is_an_error(tmp_path, capsys):
    root = tmp_path / "raw"
    for d in ("images", "labels"):
        (root / d).mkdir(parents=True)
        (root / d / "README.txt").write_text("no pngs here")
    rc, err = _run(["--layout", "gta5", "--root", root, "--out", tmp_path / "set", "--quiet"], capsys)
    assert rc == 2 and len(err) == 1 and f"{root / 'images'}: input folder holds no *.png images" in err[0], err
    assert not (tmp_path / "set" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["../../x.tar", "/etc/passwd", "sub/shard.tar", "..", ""])
def test_manifest_paths_stay_inside_the_shard_folder(name, clean, tmp_path):
    doc = json.loads(clean["manifest.json"])
    doc["shards"][1]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="is not a file name inside the manifest's folder"):
        load_manifest(tmp_path)
    doc["shards"][1]["name"] = "shard-000001.tar"
    doc["shards"][2]["index"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="index .* is not a file name"):
        load_manifest(tmp_path)


# ------------------------------------------------------------------------------------------ webdataset


def test_a_shard_set_reads_with_webdataset_alone(clean, raw, tmp_path, capsys):
    """Any WebDataset user opens our shards with the library they know: keys, images, labels."""
    import webdataset as wds

    out = tmp_path / "set"
    out.mkdir()
    for name, data in clean.items():
        (out / name).write_bytes(data)
    tars = sorted(str(p) for p in out.glob("shard-*.tar"))
    ds = wds.WebDataset(tars, shardshuffle=False).decode("pill")  # PIL images, label kept in mode "L"
    keys = []
    for s in ds:
        keys.append(s["__key__"])
        assert s["jpg"].size == s["png"].size == (160, 96) and s["json"]["key"] == s["__key__"]
        want, _ = read_label("gta5", raw["a"] / "labels" / f"{s['__key__']}.png")
        assert s["png"].mode == "L" and np.array_equal(np.asarray(s["png"]), want)
    assert keys == [r["key"] for r in load_manifest(out).samples]
    # our own reader (same library) and the inspection command
    from sdca_dist.data.webdataset_reader import iter_samples

    assert [s.key for s in iter_samples(out)] == keys
    assert [s.key for s in iter_samples(out, rank=1, world_size=3)] == keys[1::3]
    rc = shard_cli.main(["--inspect", str(out), "--limit", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[0].startswith(f"{out / 'manifest.json'}: 40 samples") and len(lines) == 3
    assert "image jpg 160x96 RGB" in lines[1]
    # a damaged tar (the header of a sample's label member) is named: tar parsing stops early there
    m = load_manifest(out)
    rec = [r for r in m.samples if r["shard"] == 2][1]
    tar = out / "shard-000002.tar"
    data = bytearray(tar.read_bytes())
    header = rec["label"][0] - 512
    data[header + 148 : header + 156] = b"9999999\0"  # a wrong header checksum
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard-000002.tar: .*{rec['key']}"):
        list(iter_samples(out))


def test_a_resume_rebuilds_from_a_damaged_shard_on(raw, clean, tmp_path, capsys):
    """A flipped tar byte or an unreadable sidecar inside the kept part: rebuilt, never trusted."""
    out = tmp_path / "set"
    _interrupted_copy(clean, out, 5)
    (out / "shard-000003.tar.json").write_text("{not json")
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[900] ^= 1
    (out / "shard-000001.tar").write_bytes(bytes(data))
    assert _run([*BUILD, "--root", raw["a"], "--out", out], capsys)[0] == 0
    assert _files(out) == clean


def test_random_access_reader_names_shard_and_key_of_a_corrupt_sample(clean, tmp_path):
    from sdca_dist.data.shard_set import ShardReader

    for name, data in clean.items():
        (tmp_path / name).write_bytes(data)
    m = load_manifest(tmp_path)
    rec = m.samples[7]
    tar = tmp_path / m.shards[rec["shard"]]["name"]
    data = bytearray(tar.read_bytes())
    data[rec["meta"][0]] = ord("}")
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{tar}: sample '{rec['key']}': corrupt meta json"):
        ShardReader(m).read(7)
