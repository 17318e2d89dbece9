"""Which settings a stage actually reads, recorded while it runs (the stage-key check).

A stage's key (``sdca_dist.stage_keys``) hashes the settings its ``StageSpec.reads`` declares. A
setting the stage reads but does not declare lets the stage cache reuse a result computed under
another value of it: a silently wrong result. The test suite runs every stage with
``SDCA_RECORD_READS=<folder>`` set; each rank of each stage then writes
``<folder>/<stage>.rank<R>.json`` with the dotted names of every setting it read, and the test
compares them with the declarations in both directions (``tests/test_stage_reads.py``).

What counts as a read, and why:

* a value taken from the run configuration (``cfg.method.tau``, ``cfg["seed"]``, ``.get``) whose
  result is not a section: the value itself (a list or dict value counts as one setting);
* a section turned into plain data or iterated (``OmegaConf.to_container(cfg.data)``,
  ``cfg.data.items()``): every setting under it;
* a field of the typed configuration (``StageContext.settings``, ``OmegaConf.to_object``) read
  through attribute access, including by a component the section was handed to. Copies made with
  ``dataclasses.replace`` keep recording, and the copy itself is not a read;
* not a read: converting or iterating the whole configuration (the DONE record, the frozen file,
  the log's list of changed settings): that is bookkeeping, which never changes what a stage
  computes. A component that took the whole configuration as plain data and computed with it
  would escape this record; none does (a review rule: components take their typed section).

Recording is off unless the environment variable is set; then it patches the configuration
classes of this process only. Nothing here changes a value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ENV = "SDCA_RECORD_READS"

_lock = threading.Lock()
_reads: set[str] = set()
_installed = False
_local = threading.local()


def recording() -> bool:
    return bool(os.environ.get(ENV))


def _add(key: str) -> None:
    if key and not getattr(_local, "paused", 0):
        with _lock:
            _reads.add(key)


@contextmanager
def unrecorded() -> Iterator[None]:
    """Reads inside are bookkeeping (a conversion's own walk, a log line), not the stage's."""
    _local.paused = getattr(_local, "paused", 0) + 1
    try:
        yield
    finally:
        _local.paused -= 1


def _full_key(node: Any, key: Any) -> str:
    try:
        return str(node._get_full_key(key))
    except Exception:  # noqa: BLE001 - a key omegaconf cannot name is not a setting
        return ""


def _install_dictconfig() -> None:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def wrap_get(original):
        def get(self, key, *args, **kwargs):
            value = original(self, key, *args, **kwargs)
            if not isinstance(value, DictConfig) and isinstance(key, str) and not key.startswith("_"):
                _add(_full_key(self, key))
            return value

        return get

    def section(node) -> None:
        if isinstance(node, (DictConfig, ListConfig)) and node._get_parent() is not None:
            _add(_full_key(node, ""))

    def wrap_whole(original):
        def whole(self, *args, **kwargs):
            section(self)
            with unrecorded():
                return original(self, *args, **kwargs)

        return whole

    for name in ("__getattr__", "__getitem__", "get"):
        setattr(DictConfig, name, wrap_get(getattr(DictConfig, name)))
    for name in ("items", "values"):
        setattr(DictConfig, name, wrap_whole(getattr(DictConfig, name)))

    def wrap_convert(original):
        def convert(cfg, *args, **kwargs):
            section(cfg)
            with unrecorded():
                return original(cfg, *args, **kwargs)

        return staticmethod(convert)

    OmegaConf.to_container = wrap_convert(OmegaConf.to_container)
    OmegaConf.to_object = wrap_convert(OmegaConf.to_object)


def _in_replace() -> bool:
    """True when the caller is ``dataclasses.replace`` copying fields (a copy, not a use)."""
    frame = sys._getframe(2)
    return frame.f_code.co_filename == dataclasses.__file__ and frame.f_code.co_name in ("replace", "_replace")


_tracked: dict[tuple[type, str], type] = {}


def _tracking_class(cls: type, path: str) -> type:
    """A subclass of the dataclass ``cls`` whose field reads are recorded as ``path.field``."""
    key = (cls, path)
    if key not in _tracked:
        fields = {f.name for f in dataclasses.fields(cls)}

        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            if name in fields and not dataclasses.is_dataclass(value) and not _in_replace():
                _add(f"{path}.{name}" if path else name)
            return value

        _tracked[key] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})
    return _tracked[key]


def track_typed(settings: Any, path: str = "") -> Any:
    """Mark every dataclass of the typed configuration ``settings`` (in place) so that reads of
    its fields are recorded; returns it. A no-op unless recording."""
    if not recording() or not dataclasses.is_dataclass(settings):
        return settings
    for f in dataclasses.fields(settings):
        value = object.__getattribute__(settings, f.name)
        if dataclasses.is_dataclass(value):
            track_typed(value, f"{path}.{f.name}" if path else f.name)
    object.__setattr__(settings, "__class__", _tracking_class(type(settings), path))
    return settings


def start() -> None:
    """Start recording in this process (once) if ``SDCA_RECORD_READS`` is set."""
    global _installed
    if recording() and not _installed:
        _install_dictconfig()
        _installed = True


def write(stage: str, rank: int) -> None:
    """Write this process's reads to ``$SDCA_RECORD_READS/<stage>.rank<rank>.json`` (if recording)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    with _lock:
        keys = sorted(_reads)
    path = Path(folder) / f"{stage}.rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stage": stage, "rank": rank, "reads": keys}, indent=1) + "\n")
    os.replace(tmp, path)
