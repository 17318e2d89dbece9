"""The test suite's layers, shared fixtures and the SLURM skip rule (tests/README.md).

Layers (markers), assigned to every collected test here so that no test file has to say it:

* ``slurm``: everything under ``tests/slurm/`` (a real SLURM cluster, brought up by
  ``tests/slurm/cluster.sh``). Skipped with a one-line reason where it cannot run: not root, or no
  ``apt-get`` (the cluster's packages are installed with it), unless ``SDCA_SLURM_EXTERNAL=1``
  names a running cluster. CI runs as root on Debian, so CI runs them.
* ``integration``: a test that starts processes: the train / launcher / predict / shard / bench
  command lines, torchrun, ``mp.spawn`` gloo groups. Found by reading the source of the test, of
  the fixtures it uses and of the module's helpers it calls, so a new test lands in the right
  layer without a marker.
* ``unit``: everything else, in one process.

A test that carries ``@pytest.mark.unit`` or ``@pytest.mark.integration`` itself keeps it.

No GPU: the suite hides the GPUs (``CUDA_VISIBLE_DEVICES=""``) from itself and every process it
starts, so it passes on a GPU node as on CI (``tests/gpu/`` is the GPU check, run by hand).

Fixtures: ``shards`` (below) is the one tiny synthetic benchmark that the engine tests share and
``tiny_chain`` the one finished chain on it that the lineage, fault and status tests copy;
``synth_root`` / ``shard_sets`` (the data tests' in-process benchmark) are registered from
``data_fixtures`` and ``valset`` (the predict tests' val set) from ``predict_fixtures``. The
``*_fixtures`` modules stay importable for their plain helpers.

Parallel runs (``-n 2``, pytest-xdist): the scheduler below hands each worker whole scopes
(``layers.xdist_scope``): a test module, so that each module-scoped fixture (a trained chain, a
grid) is computed once, and all of ``tests/slurm`` as one, as those tests share one cluster and
derive their ranks' port from the job id. Each worker has its own session fixtures (its own tiny
benchmark), so a test that changes a shard set for a moment (and restores it) never races with
another worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_fixtures import run_launcher, tiny
from layers import HERE, LAYERS, slurm_skip_reason, starts_processes, xdist_scope

pytest_plugins = ["data_fixtures", "predict_fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    # a CPU suite: on a GPU node neither this process (in-process gloo groups, device choice) nor
    # any process it starts (every env is derived from this one, ``engine_fixtures.child_env``)
    # may see the GPUs, as the tests assert gloo and CPU devices. Set before torch touches CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    config.addinivalue_line("markers", "unit: in one process, no subprocess (seconds)")
    config.addinivalue_line("markers", "integration: starts processes (CLIs, torchrun, gloo groups)")
    config.addinivalue_line("markers", "slurm: runs against a real SLURM cluster (tests/slurm, root)")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Shards root of the tiny synthetic benchmark (``engine_fixtures.TINY``), one per session.

    The first run that uses it generates and packs the benchmark there (``conf=synthetic``
    generates missing shards on first use, under a lock, so concurrent ranks wait for one
    generator); every later test reuses it."""
    return tmp_path_factory.mktemp("tiny_shards")


@pytest.fixture(scope="session")
def tiny_chain(shards, tmp_path_factory) -> Path:
    """A finished run folder of the whole chain with the alignment ablation (``train.iters=2``),
    made once per session through the launcher's local mode. Tests that change a run copy it
    first (``shutil.copytree``); nothing may write into this folder.

    Each stage records the settings it read (``sdca_dist.config.reads``) in ``<run>/../reads``,
    outside the run folder, for ``test_stage_reads``."""
    run = tmp_path_factory.mktemp("tiny_chain") / "run"
    proc = run_launcher(
        tiny(shards, "cluster=local", f"run_dir={run}", "train.iters=2", "with_ablation=true"),
        SDCA_RECORD_READS=str(run.parent / "reads"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unused without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ScopeScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slurm = slurm_skip_reason()
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.is_relative_to(HERE / "slurm"):
            item.add_marker(pytest.mark.slurm)
            if skip_slurm:
                item.add_marker(pytest.mark.skip(reason=skip_slurm))
            continue
        if any(item.get_closest_marker(layer) for layer in LAYERS):
            continue
        is_integration = isinstance(item, pytest.Function) and starts_processes(item)
        item.add_marker(pytest.mark.integration if is_integration else pytest.mark.unit)
