"""Cluster backends: where the launcher runs the planned stages.

``cluster.name`` names a backend, and the backend is the module of that name in this folder:
``sdca_dist/launch/backends/<name>.py`` defines ``BACKEND``, an instance of
``sdca_dist.launch.backends.base.Backend``. A new backend is that module plus
``conf/cluster/<name>.yaml`` (whose ``name:`` is the module's name). ``cluster.name`` is checked
here, where the backend is chosen (``backend``): an unknown name is one line listing the modules
found in this folder, found without importing any of them. Importing a backend imports neither
submitit nor torch (a backend imports them when it runs its jobs).

Imports run one way: the launcher, a grid and the status view import the backends, and a backend
imports only what lies below the launcher (the configuration schema and ``ConfigError``, the
run folder, the stage table, files); ``base.py`` holds the types they share (``Todo``,
``LaunchError``, ``LaunchHooks``, ``QueuedJob``), so no backend imports the launcher's plan. The
one import that reaches the engine side is ``slurm.py``'s of ``sdca_dist.jobs`` (the callable
submitit pickles and the nodes run), made when it submits so that planning loads no torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from sdca_dist.config import ConfigError

if TYPE_CHECKING:
    from sdca_dist.launch.backends.base import Backend

#: modules of this folder that are not backends
_NOT_BACKENDS = ("base",)


def backend_names() -> tuple[str, ...]:
    """The valid ``cluster.name`` values: the backend modules in this folder."""
    found = (m.name for m in pkgutil.iter_modules(__path__))
    return tuple(sorted(n for n in found if n not in _NOT_BACKENDS and not n.startswith("_")))


def backend(name: str) -> Backend:
    """The backend ``cluster.name`` names; a ``ConfigError`` naming the valid ones otherwise."""
    if name not in backend_names():
        raise ConfigError(f"cluster.name={name!r}; valid: {', '.join(backend_names())}")
    return importlib.import_module(f"{__name__}.{name}").BACKEND
