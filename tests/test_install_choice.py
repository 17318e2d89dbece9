"""launch/torch_build.py: the torch build and the DALI package install.sh picks, for given driver
versions and GPU compute capabilities, the check of the build pip installed, and the lock file
(pure logic; the install itself is checked by CI's ``bash launch/install.sh --dev``)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from engine_fixtures import REPO

_spec = importlib.util.spec_from_file_location("torch_build", REPO / "launch" / "torch_build.py")
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)


@pytest.mark.parametrize(
    "driver, asked, build",
    [
        (None, None, "cpu"),  # no nvidia-smi: the CPU build
        ("525.60.13", None, "12"),  # the oldest driver for CUDA 12
        ("550.54.15", None, "12"),
        ("575.57.08", None, "12"),
        ("580.65.06", None, "13"),  # the oldest driver for CUDA 13
        ("590.44.01", None, "13"),
        ("590.44.01", "12", "12"),  # asked for: an older build on a newer driver is fine
        ("560", None, "12"),
        (None, "12", "12"),  # a login node without a driver prepares a GPU venv for the compute nodes
        (None, "13", "13"),
    ],
)
def test_the_newest_build_the_driver_runs(driver, asked, build):
    assert tb.cuda_build(driver, asked) == build


@pytest.mark.parametrize(
    "driver, cc, asked, build",
    [
        ("590.44.01", "7.0", None, "12"),  # a V100 under a CUDA 13 driver: CUDA 13 dropped Volta
        ("590.44.01", "6.1", None, None),  # Pascal: no build of torch 2.13 runs it
        ("590.44.01", "7.5", None, "13"),  # Turing: the oldest GPU CUDA 13 supports
        ("590.44.01", "9.0", None, "13"),
        ("550.54.15", "9.0", None, "12"),  # the driver still decides
        ("590.44.01", "7.0", "12", "12"),
    ],
)
def test_a_gpu_older_than_cuda13_supports_gets_cuda12(driver, cc, asked, build):
    if build is None:
        with pytest.raises(tb.ChoiceError, match=r"compute capability 6\.1 is below what any torch CUDA build"):
            tb.cuda_build(driver, asked, cc)
    else:
        assert tb.cuda_build(driver, asked, cc) == build


def test_cuda13_asked_for_on_a_volta_gpu_is_refused_in_one_line():
    with pytest.raises(
        tb.ChoiceError, match=r"compute capability 7\.0 is below what CUDA 13 supports \(7\.5\); use --cuda 12"
    ):
        tb.cuda_build("590.44.01", "13", "7.0")


def test_without_a_gpu_and_without_cuda_the_cpu_build_from_its_own_index_by_its_label():
    """PyPI's torch==2.13.0 is a CUDA build on Linux x86_64: the CPU build is pinned as 2.13.0+cpu,
    which no index but the CPU one (or a local file of that very build) can satisfy."""
    build = tb.cuda_build(None, None)
    assert build == "cpu"
    assert tb.torch_spec(build) == f"{tb.TORCH_VERSION}+cpu"
    assert tb.TORCH_INDEX[build] == "https://download.pytorch.org/whl/cpu"
    assert [tb.torch_spec(b) for b in ("12", "13")] == [f"{tb.TORCH_VERSION}+cu128", f"{tb.TORCH_VERSION}+cu130"]
    assert tb.TORCH_INDEX["12"].endswith("/cu128") and tb.TORCH_INDEX["13"].endswith("/cu130")


@pytest.mark.parametrize(
    "want, version, cuda, ok",
    [
        ("cpu", "2.13.0+cpu", None, True),
        ("cpu", "2.13.0", "12.8", False),  # PyPI's default build taken for the CPU one
        ("cpu", "2.13.0", None, False),  # no label: not known to be the CPU build
        ("cu128", "2.13.0+cu128", "12.8", True),
        ("cu128", "2.13.0+cu130", "13.0", False),  # another index's build substituted
        ("cu130", "2.13.0+cu130", "13.0", True),
        ("cu130", "2.13.0+cpu", None, False),
    ],
)
def test_the_installed_build_is_checked_against_the_one_asked_for(want, version, cuda, ok):
    if ok:
        tb.check_installed(want, version, cuda)
    else:
        with pytest.raises(tb.ChoiceError, match=f"pip installed torch {re.escape(version)} .*not the {want} build"):
            tb.check_installed(want, version, cuda)


@pytest.mark.parametrize(
    "driver, asked, message",
    [
        ("470.256.02", None, "older than any torch CUDA build needs (525.60.13"),
        ("525.60.12", None, "older than any torch CUDA build"),
        ("570.86.10", "13", "older than CUDA 13 needs (580.65.06); use --cuda 12"),
        ("550.54.15", "11", "choose one of 12, 13"),
        ("n/a", None, "cannot read the NVIDIA driver version"),
    ],
)
def test_a_driver_too_old_is_refused_in_one_line(driver, asked, message):
    with pytest.raises(tb.ChoiceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tb.cuda_build(driver, asked)


def test_dali_follows_torchs_cuda_and_a_cpu_torch_keeps_the_cuda12_package():
    assert tb.dali_extra("12.8") == "dali-cuda12"
    assert tb.dali_extra("13.0") == "dali-cuda13"
    assert tb.dali_extra(None) == tb.dali_extra("None") == tb.dali_extra("cpu") == "dali-cuda12"
    with pytest.raises(tb.ChoiceError, match="CUDA 11.8"):
        tb.dali_extra("11.8")


def test_extras_exist_in_pyproject_and_the_floor_is_the_tested_torch():
    text = (REPO / "pyproject.toml").read_text()
    for extra in tb.DALI_EXTRA.values():
        assert f"\n{extra} = [" in text, extra
    assert f'"torch>={".".join(tb.TORCH_VERSION.split(".")[:2])}"' in text


def test_command_line_prints_the_choice_and_exits_2_on_a_refusal():
    run = [sys.executable, str(REPO / "launch" / "torch_build.py")]
    ok = subprocess.run(run + ["torch", "--driver", "550.54.15"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.split() == ["12", tb.TORCH_INDEX["12"], "2.13.0+cu128"]
    cpu = subprocess.run(run + ["torch", "--driver", "", "--cc", ""], capture_output=True, text=True)
    assert cpu.returncode == 0 and cpu.stdout.split() == ["cpu", tb.TORCH_INDEX["cpu"], "2.13.0+cpu"]
    old = subprocess.run(run + ["torch", "--driver", "590.44.01", "--cc", "7.0"], capture_output=True, text=True)
    assert old.returncode == 0 and old.stdout.split()[0] == "12"
    wrong = subprocess.run(
        run + ["check", "--want", "cpu", "--have-version", "2.13.0", "--have-cuda", "12.8"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "not the cpu build" in wrong.stderr
    bad = subprocess.run(run + ["torch", "--driver", "470.1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("install: driver 470.1")


def test_lock_lines_pin_every_package_but_the_project_and_drop_torchs_build_label():
    freeze = "\n".join(
        [
            "numpy==2.4.6",
            "torch==2.13.0+cpu",
            "# Editable Git install with no remote (sdca_dist==0.1.0)",
            "-e /work/main",
            "Pillow==13.0.0",
            "foo @ file:///tmp/foo.whl",
            "typing_extensions==4.16.0",
        ]
    )
    assert tb.lock_lines(freeze) == ["numpy==2.4.6", "Pillow==13.0.0", "torch==2.13.0", "typing_extensions==4.16.0"]


def test_the_lock_file_pins_every_runtime_and_dev_dependency_and_drops_torch_for_a_clusters_torch():
    text = (REPO / "launch" / "constraints.txt").read_text()
    pins = tb.constraints(text, without_torch=False).split()
    names = {tb._name(line) for line in pins}
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line) for line in pins), pins
    for dep in ("torch", "deepspeed", "numpy", "pillow", "nvidia-dali-cuda120", "hydra-core", "pytest", "ruff"):
        assert dep in names, dep
    assert f"torch=={tb.TORCH_VERSION}" in pins  # the release the build choice installs
    ruff = re.search(r'"ruff==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"ruff=={ruff}" in pins  # the lock agrees with pyproject's own pin
    mine = tb.constraints(text, without_torch=True).split()
    assert "torch" not in {tb._name(line) for line in mine} and len(mine) == len(pins) - 1
