"""Shard verification records: a tar hashed once is not read again while its file is unchanged.

Hashing every shard tar is what makes a damaged or replaced tar visible, but at real sizes
(GTA5 ~12 GB, Cityscapes ~7.6 GB) it cannot happen on every launch, every ``status=true`` and
every stage start. So each time a tar is hashed (by a stage start, the launcher, ``--verify`` or
the writer that made it) a record of that file is kept::

    {"name", "sha256", "dev", "ino", "size", "mtime_ns", "ctime_ns", "host", "verified"}

and later readers trust the record's sha256 while the file's ``stat`` still gives the same
inode, size, mtime and ctime (and device, when the record was made on this host: NFS and
Lustre clients number devices per node, while the record's place already fixes the file
system). Any write to the tar changes its mtime and ctime; a file put in its place (copy,
rsync, repack) has another inode; even ``touch -d`` or ``cp -p`` that restore the mtime change
the ctime, which no user can set. A changed tar is therefore seen as changed from ``stat``
alone, without reading it. What stat cannot see (bytes rotting on the storage under an
unchanged inode) is found by the periodic full check: stage starts re-hash a tar whose record
is older than ``FULL_CHECK_DAYS`` (and ``python -m sdca_dist.shard --verify`` re-hashes all).

Where records live: beside the shard set, ``<parent>/.verified/<set folder name>/<tar>.json``,
so every node and every user of the set shares them; not inside the set's folder, which holds
exactly what the packer wrote (identical bytes on a rebuild). When that place is not writable (a
shared data set under a read-only parent), in ``$SDCA_VERIFY_DIR`` or else
``~/.cache/sdca_dist/shard-verify``, under a folder named by a hash of the set's resolved path
(the home folder is the writable place a site usually shares between login and compute nodes;
on a site where it is not shared, set ``SDCA_VERIFY_DIR`` to a shared path).
Records are written atomically (temp file + rename) and only when the file's stat was the same
before and after hashing, so a tar that changed while being read gets no record. Writing a
record is best effort: a failure leaves the tar to be hashed again next time, never an error.
No torch here: the launcher and the status view use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdca_dist.files import atomic_write_text, read_json_dict, sha256_file

RECORDS = ".verified"
#: a record older than this is not trusted by a stage start (the periodic full check)
FULL_CHECK_DAYS = 30.0
_STAT_FIELDS = ("ino", "size", "mtime_ns", "ctime_ns")


@dataclass(frozen=True)
class FileState:
    """The part of a file's ``stat`` that changes whenever its bytes (or the file) change."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @staticmethod
    def of(path: Path) -> "FileState":
        st = os.stat(path)
        return FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def as_dict(self) -> dict[str, int]:
        return {
            "dev": self.dev,
            "ino": self.ino,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
        }


def cache_records_dir() -> Path:
    """Where records of read-only shard sets go: ``$SDCA_VERIFY_DIR``, else the user's cache."""
    env = os.environ.get("SDCA_VERIFY_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdca_dist" / "shard-verify"


def record_paths(tar: Path) -> tuple[Path, Path]:
    """(beside the set, in the cache folder) record paths of ``tar``; readers try both in order."""
    tar = Path(tar)
    beside = tar.parent.parent / RECORDS / tar.parent.name / f"{tar.name}.json"
    folder_id = hashlib.sha256(str(tar.parent.resolve()).encode()).hexdigest()[:16]
    return beside, cache_records_dir() / folder_id / f"{tar.name}.json"


def same_file(seen: dict, state: FileState) -> bool:
    """Whether ``state`` is the file ``seen`` (a record, or a rank's result) describes: the same
    inode, size, mtime and ctime; the device number too when ``seen`` was made on this host
    (NFS and Lustre clients number devices per node)."""
    if any(seen.get(k) != getattr(state, k) for k in _STAT_FIELDS):
        return False
    return seen.get("host") != socket.gethostname() or seen.get("dev") == state.dev


def _matches(record: dict, state: FileState, tar: Path) -> bool:
    if record.get("name") != tar.name or not isinstance(record.get("sha256"), str):
        return False
    return same_file(record, state)


def lookup(tar: Path, state: Optional[FileState] = None, max_age_days: Optional[float] = None) -> Optional[str]:
    """The sha256 a record holds for ``tar`` as it is now, or None (no record, the file changed
    since, or the record is older than ``max_age_days``). Reads no byte of the tar."""
    tar = Path(tar)
    try:
        state = state or FileState.of(tar)
    except OSError:
        return None
    for path in record_paths(tar):
        record = read_json_dict(path)
        if record is None or not _matches(record, state, tar):
            continue
        if max_age_days is not None:
            age = time.time() - float(record.get("verified", 0))
            if age > max_age_days * 86400:
                continue
        return record["sha256"]
    return None


def why_unverified(tar: Path) -> str:
    """Why ``tar`` has no valid record, in words (for the status view): missing, never
    verified, or which part of its stat changed since it was."""
    tar = Path(tar)
    try:
        state = FileState.of(tar)
    except OSError:
        return f"the shard {tar} is missing"
    records = [r for r in (read_json_dict(p) for p in record_paths(tar)) if r is not None]
    if not records:
        return f"the shard {tar} has no verification record (never hashed here)"
    rec = records[0]
    changed = [k for k in ("ino", "size", "mtime_ns", "ctime_ns") if rec.get(k) != getattr(state, k)]
    if rec.get("host") == socket.gethostname() and rec.get("dev") != state.dev:
        changed.insert(0, "dev")
    what = ", ".join(changed) or "record"
    return f"the shard {tar} changed since it was verified ({what} differ)"


def write_record(tar: Path, sha256: str, state: FileState) -> Optional[Path]:
    """Record that ``tar`` in ``state`` has ``sha256``: beside the set, else in the cache
    folder. Returns the record's path, or None when neither place could be written."""
    tar = Path(tar)
    payload = {
        "name": tar.name,
        "sha256": sha256,
        **state.as_dict(),
        "host": socket.gethostname(),
        "verified": time.time(),
    }
    text = json.dumps(payload, indent=1) + "\n"
    for path in record_paths(tar):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            return path
        except OSError:
            continue
    return None


def hash_and_record(tar: Path) -> str:
    """sha256 of ``tar`` (read in full), recorded when the file did not change while it was read.
    OSError when it cannot be read."""
    tar = Path(tar)
    before = FileState.of(tar)
    sha = sha256_file(tar)
    try:
        after = FileState.of(tar)
    except OSError:
        return sha
    if after == before:
        write_record(tar, sha, after)
    return sha


def verified_sha(tar: Path, max_age_days: Optional[float] = None) -> str:
    """The tar's sha256: from its record when the file is unchanged, else hashed (and recorded)."""
    return lookup(tar, max_age_days=max_age_days) or hash_and_record(tar)


class Unverified(Exception):
    """A tar has no valid record and this reader may not hash it (the status view)."""

    def __init__(self, tar: Path) -> None:
        super().__init__(why_unverified(tar))
        self.tar = Path(tar)


def recorded_sha(tar: Path) -> str:
    """The tar's sha256 from its record alone; ``Unverified`` (saying why) when there is none
    for the file as it is now. Never reads the tar."""
    sha = lookup(tar)
    if sha is None:
        raise Unverified(tar)
    return sha


def share(sizes: list[int], rank: int, world_size: int) -> list[int]:
    """Indices of the tars (by their sizes) that ``rank`` hashes: largest first, each to the
    least loaded rank, so every rank reads about the same number of bytes. Every rank computes
    the same split from the same list."""
    loads = [0] * max(1, world_size)
    mine = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(len(loads)), key=lambda k: (loads[k], k))
        loads[r] += sizes[i]
        if r == rank:
            mine.append(i)
    return sorted(mine)


def verify_share(tars: list[tuple[Path, int]], rank: int, world_size: int, threads: int = 4) -> dict[str, dict]:
    """Hash this rank's share of ``tars`` ([(path, manifest size)]) that lack a valid record
    younger than ``FULL_CHECK_DAYS``; returns {path: {"sha256", **stat}} for what it hashed
    (unreadable or missing tars are left out: the stage's own check names them)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = []
    for i in share([size for _, size in tars], rank, world_size):
        tar = tars[i][0]
        if tar.is_file() and lookup(tar, max_age_days=FULL_CHECK_DAYS) is None:
            todo.append(tar)

    def one(tar: Path) -> Optional[tuple[str, dict]]:
        try:
            before = FileState.of(tar)
            sha = hash_and_record(tar)
            same = FileState.of(tar) == before
            return (str(tar), {"sha256": sha, **before.as_dict(), "host": socket.gethostname()}) if same else None
        except OSError:
            return None

    out: dict[str, dict] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(todo) or 1))) as pool:  # hashlib releases the GIL
        for item in pool.map(one, todo):
            if item is not None:
                out[item[0]] = item[1]
    return out
