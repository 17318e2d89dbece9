"""launch/torch_build.py: the torch CUDA build and the DALI package install.sh picks, for given
driver versions (pure logic; the install itself is checked by CI's ``bash launch/install.sh --dev``)."""

from __future__ import annotations

import importlib.util
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
    ],
)
def test_the_newest_build_the_driver_runs(driver, asked, build):
    assert tb.cuda_build(driver, asked) == build


@pytest.mark.parametrize(
    "driver, asked, message",
    [
        ("470.256.02", None, "older than any torch CUDA build needs (525.60.13"),
        ("525.60.12", None, "older than any torch CUDA build"),
        ("570.86.10", "13", "older than CUDA 13 needs (580.65.06); use --cuda 12"),
        (None, "12", "no NVIDIA driver"),
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
    assert ok.returncode == 0 and ok.stdout.split() == ["12", tb.TORCH_INDEX["12"]]
    bad = subprocess.run(run + ["torch", "--driver", "470.1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("install: driver 470.1")
