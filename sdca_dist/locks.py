"""Locks that work on any shared file system: a lock file created with ``O_EXCL``, never ``flock``.

Why not ``flock``: Lustre mounted without ``-o flock`` fails it with ENOSYS, NFSv3 with ``nolock``
with ENOLCK, and Lustre's ``localflock`` makes it succeed on every node at once (the lock then keeps
nothing out). An exclusive create (``O_CREAT|O_EXCL``) is atomic on every POSIX file system a
cluster shares (NFSv3 and later, Lustre, GPFS, BeeGFS, CephFS) and needs no lock service.

The lock file holds one JSON line naming its holder: host, pid, the pid's start time, SLURM job id
and restart count, and when it was taken. Written and read here only (``Holder``); the status
view asks ``holder_alive`` instead of parsing it. While held, a thread of the holder refreshes the
file's modification time every ``HEARTBEAT_S`` seconds (the lease). A lock whose holder died
without releasing it (SIGKILL, a lost node) is taken over when its holder is judged gone:

* holder on this host: its pid no longer runs, or runs with another start time (pid reused);
* holder is an earlier run of this very SLURM job (same job id, lower ``SLURM_RESTART_COUNT``: a
  requeued job never overlaps its earlier run);
* holder on another host: never judged by its pid (pids are per host). Its lease expired (no
  heartbeat for ``LEASE_S`` seconds) and, where ``squeue`` answers, its SLURM job is not running.

Taking over is itself exclusive (a ``<lock>.break`` file created with ``O_EXCL``), so two waiters
that both judge a holder gone never both take the lock. A file system that refuses the lock file
itself (read-only, no space, no permission) is reported in one line naming the file, its mount
and what to set (``LockError``), never a traceback.

No torch here: the launcher and the status view use it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: seconds between two refreshes of a held lock's modification time
HEARTBEAT_S = float(os.environ.get("SDCA_LOCK_HEARTBEAT_S", "30"))
#: a holder on another host whose lock file has not been refreshed for this long is gone
LEASE_S = float(os.environ.get("SDCA_LOCK_LEASE_S", "300"))
#: a ``.break`` file older than this belongs to a taker-over that died (it holds it for milliseconds)
_BREAK_STALE_S = 60.0
#: SLURM job states in which a job may still hold a lock
_LIVE_JOB_STATES = {"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STOPPED", "SIGNALING", "STAGE_OUT"}


class LockError(RuntimeError):
    """The file system refuses the lock file itself; the message names the file, mount and remedy."""


def _proc_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _job_id() -> Optional[str]:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the one line in the lock file."""

    host: str
    pid: int
    start: Optional[str] = None
    job: Optional[str] = None
    restart: int = 0
    since: float = 0.0

    @classmethod
    def me(cls) -> "Holder":
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            start=_proc_start(os.getpid()),
            job=_job_id(),
            restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            since=round(time.time(), 3),
        )

    def line(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        try:
            d = json.loads(text)
            return cls(
                host=str(d["host"]),
                pid=int(d["pid"]),
                start=d.get("start"),
                job=d.get("job"),
                restart=int(d.get("restart") or 0),
                since=float(d.get("since") or 0),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """``pid 123 on node7 (job 45)``: how messages name a holder."""
        return f"pid {self.pid} on {self.host}" + (f" (job {self.job})" if self.job else "")


def read_holder(path: Path | str) -> Optional[Holder]:
    """The holder recorded in the lock file ``path`` (None: no lock file, or one being written)."""
    try:
        return Holder.parse(Path(path).read_text())
    except OSError:
        return None


def _job_running(job: str) -> Optional[bool]:
    """Whether SLURM job ``job`` is in a state in which it may hold a lock (None: unknown)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    states = set(out.stdout.split())
    return bool(states & _LIVE_JOB_STATES)


def gone_reason(holder: Optional[Holder], mtime: float, now: Optional[float] = None) -> Optional[str]:
    """Why the lock held by ``holder`` (file modified at ``mtime``) is left by a holder that is gone;
    None while it may still be alive. ``holder`` None: a lock file still being written (or not
    ours to read), judged by its lease only."""
    now = time.time() if now is None else now
    if holder is not None and holder.host == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return f"its holder {holder.describe()} has ended"
        except PermissionError:
            pass
        if holder.start is not None and _proc_start(holder.pid) not in (None, holder.start):
            return f"its holder {holder.describe()} has ended (the pid now belongs to another process)"
        return None
    me = Holder.me()
    if holder is not None and holder.job is not None and holder.job == me.job and holder.restart < me.restart:
        return f"its holder {holder.describe()} is an earlier run of this job (requeued since)"
    if now - mtime <= LEASE_S:
        return None
    if holder is not None and holder.job is not None and _job_running(holder.job):
        return None
    return f"its holder {holder.describe() if holder else '(unreadable)'} has not renewed it for {now - mtime:.0f} s"


def holder_alive(path: Path | str) -> bool:
    """Whether the lock file ``path`` is held by a holder that may still be alive (the status view:
    read only, never takes the lock)."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    return gone_reason(read_holder(path), mtime) is None


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file-system type) of ``path``, from /proc/self/mounts ("?" when unknown)."""
    path = path.resolve()
    best, fstype = "/", "?"
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    except OSError:
        pass
    return best, fstype


def _refusal(path: Path, exc: OSError, setting: str) -> LockError:
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    mount, fstype = _mount_of(where)
    return LockError(
        f"cannot create the lock file {path} ({exc.strerror or exc}) on {mount} ({fstype}): locks need a folder "
        f"this job can write on a file system all nodes share; set {setting} to one"
    )


class _Heartbeat:
    """One daemon thread per process refreshing the modification time of every lock it holds."""

    def __init__(self) -> None:
        self._paths: set[Path] = set()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def add(self, path: Path) -> None:
        with self._cond:
            self._paths.add(path)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sdca-lock-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, path: Path) -> None:
        with self._cond:
            self._paths.discard(path)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(HEARTBEAT_S)
                paths = list(self._paths)
            for p in paths:
                try:
                    os.utime(p)
                except OSError:
                    pass


_HEARTBEAT = _Heartbeat()


class FileLock:
    """An exclusive lock on ``path`` (a lock file), for one process at a time on any host.

    ``setting``: the key a user sets to move the lock's folder (named in a refusal)."""

    def __init__(self, path: Path | str, setting: str = "the folder") -> None:
        self.path = Path(path)
        self.setting = setting
        self._mine: Optional[str] = None

    @property
    def held(self) -> bool:
        return self._mine is not None

    def _create(self) -> bool:
        """Create the lock file with this process as holder; False when it exists."""
        line = Holder.me().line()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _refusal(self.path, exc, self.setting) from None
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise _refusal(self.path, exc, self.setting) from None
        os.close(fd)
        self._mine = line
        _HEARTBEAT.add(self.path)
        return True

    def _break_if_gone(self) -> bool:
        """Remove the lock file when its holder is gone (exclusively: one taker-over at a time)."""
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except OSError:
            return True  # released meanwhile: try again
        if gone_reason(Holder.parse(text), mtime) is None:
            return False
        brk = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - brk.stat().st_mtime > _BREAK_STALE_S:
                    brk.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        except OSError as exc:
            raise _refusal(brk, exc, self.setting) from None
        os.close(fd)
        try:
            try:
                if self.path.read_text() == text:  # still the holder judged gone, not a new one
                    self.path.unlink()
            except OSError:
                pass
        finally:
            brk.unlink(missing_ok=True)
        return True

    def holder(self) -> Optional[Holder]:
        return read_holder(self.path)

    def try_acquire(self) -> bool:
        """Take the lock if it is free or its holder is gone; False while a live holder has it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _refusal(self.path, exc, self.setting) from None
        for _ in range(3):
            if self._create():
                return True
            if not self._break_if_gone():
                return False
        return False

    def acquire(self, poll_s: float = 1.0, on_wait: Optional[Callable[[Optional[Holder]], None]] = None) -> None:
        """Wait for the lock; ``on_wait(holder)`` is called once when it has to wait."""
        said = False
        while not self.try_acquire():
            if not said and on_wait is not None:
                on_wait(self.holder())
            said = True
            time.sleep(poll_s)

    def release(self) -> None:
        """Give the lock up (removes the lock file, unless another process took it over)."""
        if self._mine is None:
            return
        _HEARTBEAT.discard(self.path)
        try:
            if self.path.read_text() == self._mine:
                self.path.unlink()
        except OSError:
            pass
        self._mine = None

    def __enter__(self) -> "FileLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
