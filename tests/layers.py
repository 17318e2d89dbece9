"""Which layer a test is in, and whether the SLURM tests can run here (used by tests/conftest.py;
a plain module so that tests can import it: every conftest.py is named ``conftest``)."""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "slurm")

#: what starting a process looks like in this suite's source
_SPAWNS = (
    "subprocess",
    "Popen",
    "run_train(",
    "run_launcher(",
    "run_predict(",
    "train_cmd(",
    "run_distributed(",
    "mp.spawn",
    "torch.distributed.run",
    "shard_command(",
    "synth_command(",
    "sys.executable",
)


def xdist_scope(nodeid: str) -> str:
    """The scope a pytest-xdist worker runs whole (tests/conftest.py): ``tests/slurm`` for every
    SLURM test, else the test's module (``tests/test_x.py::test_y[p]`` -> ``tests/test_x.py``)."""
    module = nodeid.split("::", 1)[0]
    return "tests/slurm" if module.startswith("tests/slurm/") else module


def slurm_skip_reason() -> str | None:
    """Why tests/slurm cannot run here (one line), or None."""
    if os.environ.get("SDCA_SLURM_EXTERNAL") == "1":
        return None
    if os.geteuid() != 0:
        return "tests/slurm starts a SLURM cluster and needs root (or SDCA_SLURM_EXTERNAL=1, tests/slurm/README.md)"
    if shutil.which("apt-get") is None:
        return "tests/slurm installs SLURM with apt-get, which this machine lacks (or SDCA_SLURM_EXTERNAL=1)"
    return None


def _source(obj) -> str:
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return ""


def _called_names(src: str) -> set[str]:
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return set()
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _suite_fixtures(item: pytest.Function) -> list:
    """The functions of the fixtures ``item`` uses (``item.fixturenames``, which includes the
    fixtures of its fixtures) that this suite defines: in the test's module, a ``conftest.py`` or a
    ``*_fixtures`` plugin module. pytest's own fixtures (tmp_path, request) are not read."""
    homes = [item.module] + [
        p
        for p in item.config.pluginmanager.get_plugins()
        if inspect.ismodule(p) and getattr(p, "__file__", None) and Path(p.__file__).resolve().is_relative_to(HERE)
    ]
    found = []
    for name in item.fixturenames:
        for home in homes:
            fixture = getattr(home, name, None)
            if fixture is not None and inspect.isfunction(inspect.unwrap(fixture)):
                found.append(fixture)
    return found


def starts_processes(item: pytest.Function) -> bool:
    """Whether the test, a fixture it uses, or a module helper either calls, starts a process."""
    module = item.module
    todo = [item.function, *_suite_fixtures(item)]
    seen: set[int] = set()
    while todo:
        fn = inspect.unwrap(todo.pop())
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        src = _source(fn)
        if any(token in src for token in _SPAWNS):
            return True
        for name in _called_names(src):  # helpers of the same test module
            helper = getattr(module, name, None)
            if inspect.isfunction(helper) and helper.__module__ == module.__name__:
                todo.append(helper)
    return False
