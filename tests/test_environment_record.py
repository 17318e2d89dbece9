"""environment.json: each stage start records the versions and the machine it ran with, and a
restart under other versions says which moved (a resumed run then mixes two environments)."""

from __future__ import annotations

import json
from importlib import metadata

import numpy
import torch

from sdca_dist.engine.environment import FILE, changed_versions, record_environment


def test_the_record_holds_the_versions_that_move_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    env = record_environment(tmp_path, log=lambda m: None)
    assert env["variables"]["DNNL_MAX_CPU_ISA"] == "AVX2"  # a kernel choice made by hand is on record
    on_disk = json.loads((tmp_path / FILE).read_text())
    assert on_disk == env
    assert env["torch_build"] == torch.__version__ and env["packages"]["numpy"] == numpy.__version__
    assert env["packages"]["pillow"] == metadata.version("pillow")
    assert env["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["machine"]["torch_threads"] == torch.get_num_threads() and env["gpu"] is None


def test_a_restart_under_other_versions_names_what_moved(tmp_path):
    record_environment(tmp_path, log=lambda m: None)
    old = json.loads((tmp_path / FILE).read_text())
    old["packages"]["numpy"] = "1.26.4"
    old["machine"]["cpu_capability"] = "AVX512"
    (tmp_path / FILE).write_text(json.dumps(old))
    lines: list[str] = []
    record_environment(tmp_path, log=lines.append)
    assert len(lines) == 1, lines
    assert f"numpy 1.26.4 -> {numpy.__version__}" in lines[0]
    assert f"cpu capability AVX512 -> {torch.backends.cpu.get_cpu_capability()}" in lines[0]
    # the same environment again: nothing to say
    lines.clear()
    record_environment(tmp_path, log=lines.append)
    assert lines == []
    assert changed_versions({"packages": {"x": "1"}}, {"packages": {"x": "1"}}) == []
