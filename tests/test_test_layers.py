"""The suite's layers (tests/conftest.py, tests/layers.py): each test is in exactly one, and tests/slurm skips with
one line where it cannot run instead of failing."""

from __future__ import annotations

from pathlib import Path

import layers
import pytest


def test_every_collected_test_is_in_exactly_one_layer(request):
    for item in request.session.items:
        found = [m.name for m in item.iter_markers() if m.name in layers.LAYERS]
        assert len(found) == 1, (item.nodeid, found)
    assert request.node.get_closest_marker("unit") is not None  # this test starts no process


@pytest.mark.parametrize(
    "euid, apt, external, expect",
    [
        (1000, "/usr/bin/apt-get", None, "needs root"),
        (0, None, None, "apt-get"),
        (1000, None, "1", None),
        (0, "/usr/bin/apt-get", None, None),
    ],
)
def test_slurm_tests_skip_with_one_line_where_they_cannot_run(monkeypatch, euid, apt, external, expect):
    monkeypatch.setattr(layers.os, "geteuid", lambda: euid)
    monkeypatch.setattr(layers.shutil, "which", lambda name: apt if name == "apt-get" else None)
    if external is None:
        monkeypatch.delenv("SDCA_SLURM_EXTERNAL", raising=False)
    else:
        monkeypatch.setenv("SDCA_SLURM_EXTERNAL", external)
    reason = layers.slurm_skip_reason()
    if expect is None:
        assert reason is None
    else:
        assert expect in reason and "\n" not in reason


def test_a_parallel_worker_runs_a_whole_module_and_all_slurm_tests(request):
    """``-n N`` hands whole scopes to a worker: a module's fixtures are computed once, and one worker
    runs every SLURM test against the one cluster."""
    for item in request.session.items:
        path = Path(str(item.fspath)).resolve().relative_to(layers.HERE.parent).as_posix()
        assert layers.xdist_scope(item.nodeid) == ("tests/slurm" if path.startswith("tests/slurm/") else path)
    assert layers.xdist_scope(request.node.nodeid) == "tests/test_test_layers.py"
    assert layers.xdist_scope("tests/slurm/test_b.py::test_c[1-x]") == layers.xdist_scope("tests/slurm/test_a.py::t")
