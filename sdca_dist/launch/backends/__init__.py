"""Cluster backends: where the launcher runs the planned stages.

``cluster.name`` names a backend, and the backend is the module of that name in this folder:
``sdca_dist/launch/backends/<name>.py`` defines ``BACKEND``, an instance of
``sdca_dist.launch.backends.base.Backend``. A new backend is that module plus
``conf/cluster/<name>.yaml`` (whose ``name:`` is the module's name); the configuration check of
``cluster.name`` (``sdca_dist.config.compose``) lists the modules found here. Listing them imports
none of them, so composing a configuration never imports submitit or torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdca_dist.launch.backends.base import Backend

#: modules of this folder that are not backends
_NOT_BACKENDS = ("base",)


def backend_names() -> tuple[str, ...]:
    """The valid ``cluster.name`` values: the backend modules in this folder."""
    found = (m.name for m in pkgutil.iter_modules(__path__))
    return tuple(sorted(n for n in found if n not in _NOT_BACKENDS and not n.startswith("_")))


def backend(name: str) -> Backend:
    """The backend ``cluster.name`` names (a ``KeyError`` naming the valid ones otherwise)."""
    if name not in backend_names():
        raise KeyError(f"unknown cluster.name={name!r}; valid: {', '.join(backend_names())}")
    return importlib.import_module(f"{__name__}.{name}").BACKEND
