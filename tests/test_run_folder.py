"""The run folder's one home and the launcher's backend seam.

Specifications:
* every file and folder a real run leaves (the session's finished chain, through the launcher)
  is named in ``sdca_dist.run_folder``, at the run's top level and in each stage folder;
* the seed folder rules: a launch's planned folders are the ones found again, for one seed and
  for several;
* the package's imports close no circle (every import, at module level or in a function, and
  the parent packages each import runs);
* in the launcher, nothing outside ``sdca_dist/launch/backends/`` talks to a scheduler or imports
  the SLURM backend: a grid, the launcher and the status view ask the backend (on the nodes the
  engine reads SLURM's environment itself); the status view writes
  nothing (the records it reads are written by the engine and the backends).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from sdca_dist import run_folder
from sdca_dist.stage_table import TABLE

PACKAGE = Path(__file__).resolve().parents[1] / "sdca_dist"
SCHEDULER_COMMANDS = {"squeue", "sacct", "sinfo", "scancel", "sbatch", "scontrol", "srun"}


def test_every_name_a_finished_run_leaves_is_declared(tiny_chain):
    stages = {s.name for s in TABLE}
    undeclared = []
    for entry in tiny_chain.iterdir():
        if entry.name in stages:
            undeclared += [f"{entry.name}/{p.name}" for p in entry.iterdir() if p.name not in run_folder.STAGE_FILES]
        elif entry.name not in run_folder.RUN_FILES:
            undeclared.append(entry.name)
    assert undeclared == []
    assert {p.name for p in (tiny_chain / "src").iterdir()} >= {run_folder.DONE, run_folder.LINEAGE}


def test_seed_folders_found_are_the_ones_a_launch_plans(tmp_path):
    one = run_folder.planned_seed_folders(tmp_path / "one", [3])
    assert one == [(3, tmp_path / "one")]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / run_folder.CONFIG).write_text("seed: 3\n")
    assert run_folder.seed_folders(tmp_path / "one") == one
    many = run_folder.planned_seed_folders(tmp_path / "many", [10, 2])
    assert many == [(10, tmp_path / "many" / "seed_10"), (2, tmp_path / "many" / "seed_2")]
    for _, folder in many:
        folder.mkdir(parents=True)
    (tmp_path / "many" / "seed_x").mkdir()  # not a seed folder
    assert run_folder.seed_folders(tmp_path / "many") == sorted(many)
    grid = {"points": ["a=1", "a=2"], "seeds": [0, 1]}
    shutil.copytree(tmp_path / "many", tmp_path / "grid" / "a=1")
    found = run_folder.run_folders(tmp_path / "grid", grid)
    point = tmp_path / "grid" / "a=1"
    assert found[:2] == [("a=1", 2, point / "seed_2"), ("a=1", 10, point / "seed_10")]
    assert found[2:] == [("a=2", s, tmp_path / "grid" / "a=2" / f"seed_{s}") for s in (0, 1)]  # not launched yet


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports anywhere in its source, with the parent packages
    each import runs."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for target in found:
        parts = target.split(".")
        out |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)}
    return {t for t in out if t in modules and t != name and not name.startswith(t + ".")}


def test_the_package_imports_close_no_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt) :] if nxt in path else []
                circles.append(" -> ".join([*circle, node, nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert circles == []


def _strings_and_imports(path: Path) -> tuple[set[str], set[str]]:
    strings, imported = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    return strings, imported


def test_in_the_launcher_only_the_backends_talk_to_a_scheduler():
    backends = PACKAGE / "launch" / "backends"
    for path in sorted((PACKAGE / "launch").rglob("*.py")):
        if backends in path.parents:
            continue
        strings, imported = _strings_and_imports(path)
        assert not strings & SCHEDULER_COMMANDS, f"{path} runs {strings & SCHEDULER_COMMANDS}"
        assert "sdca_dist.launch.backends.slurm" not in imported and "submitit" not in imported, path


def test_the_status_view_writes_nothing():
    tree = ast.parse((PACKAGE / "launch" / "status.py").read_text())
    called = {
        n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
    }
    writers = {"write_text", "write_bytes", "atomic_write_text", "atomic_write_bytes", "unlink", "mkdir", "open"}
    assert called & writers == set()
