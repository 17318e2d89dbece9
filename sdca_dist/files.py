"""Durable files: the one home of atomic writes and content hashes.

Shards, checkpoints, DONE records and the frozen run configuration all appear complete under
their final name or not at all: written to a temporary name in the same folder (``.tmp-<name>.<pid>``,
so concurrent writers never share one), flushed and fsynced, then renamed; on ANY failure the
temporary file is removed and the destination is untouched. No torch here: the launcher and the
shard tools use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Callable, Optional


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}.{os.getpid()}")


def atomic_write(path: Path | str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically. A file-system
    failure (no space, read-only) is an OSError whose file name is ``path`` (a failed flush
    names no file of its own)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and not exc.filename and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json_dict(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing, unreadable, not JSON or not an
    object (a record being written by another process is never half-read: writers are atomic)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
