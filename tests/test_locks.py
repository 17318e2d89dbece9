"""sdca_dist.locks: the one lock of every site (stage folder, stage-cache key, synthetic set,
config freeze), an exclusive-create lock file that needs no ``flock``.

Specifications:
* one holder at a time; a second lock on the same file is refused while the first is held, and
  the refusal names the holder (host, pid, job);
* a holder that is gone is taken over: on this host a pid that no longer runs or now belongs to
  another process; an earlier run of this very SLURM job (requeued since); on another host only
  a lease that expired (no heartbeat), never a pid;
* a holder on another host with a fresh lease is live, whatever its pid says here;
* the holder refreshes its lease while it holds the lock;
* a file system that refuses the lock file is one line naming the file, its mount and what to set;
* the status view's question (``holder_alive``) follows the same rule.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

import pytest

from sdca_dist import locks
from sdca_dist.locks import FileLock, Holder, LockError, holder_alive


def _write_holder(path, **fields) -> None:
    base = {"host": socket.gethostname(), "pid": os.getpid(), "start": None, "job": None, "restart": 0, "since": 0}
    path.write_text(json.dumps({**base, **fields}) + "\n")


def _free_pid() -> int:
    pid = int(open("/proc/sys/kernel/pid_max").read()) - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_one_holder_at_a_time_and_the_refusal_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    path = tmp_path / "x.lock"
    first, second = FileLock(path), FileLock(path)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.holder().describe() == f"pid {os.getpid()} on {socket.gethostname()} (job 4242)"
    first.release()
    assert not path.exists()
    assert second.try_acquire()
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    _write_holder(path, pid=_free_pid())
    lock = FileLock(path)
    assert lock.try_acquire()
    assert read_pid(path) == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    _write_holder(path, pid=os.getpid(), start="1")  # this pid, but started at another time
    lock = FileLock(path)
    assert lock.try_acquire()
    lock.release()


def read_pid(path) -> int:
    return Holder.parse(path.read_text()).pid


def test_another_host_is_judged_by_its_lease_never_by_pid(tmp_path):
    path = tmp_path / "x.lock"
    _write_holder(path, host="node-elsewhere", pid=_free_pid())  # that pid is free HERE: no evidence
    lock = FileLock(path)
    assert not lock.try_acquire(), "a fresh lease from another host is live"
    assert holder_alive(path)
    old = time.time() - locks.LEASE_S - 60
    os.utime(path, (old, old))
    assert not holder_alive(path)
    assert lock.try_acquire(), "an expired lease is taken over"
    lock.release()


def test_an_earlier_run_of_this_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    path = tmp_path / "x.lock"
    _write_holder(path, host="node-elsewhere", job="77", restart=0)
    assert FileLock(path).try_acquire()
    _write_holder(path.with_name("y.lock"), host="node-elsewhere", job="77", restart=1)  # this run's other rank
    assert not FileLock(path.with_name("y.lock")).try_acquire()


def test_the_holder_renews_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    path = tmp_path / "x.lock"
    lock = FileLock(path)
    assert lock.try_acquire()
    try:
        old = time.time() - 3600
        os.utime(path, (old, old))
        end = time.monotonic() + 30
        while path.stat().st_mtime < old + 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert path.stat().st_mtime > time.time() - 60, "the heartbeat did not renew the lease"
    finally:
        lock.release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EROFS])
def test_a_file_system_that_refuses_the_lock_file_is_one_line(tmp_path, monkeypatch, code):
    real_open = os.open

    def refusing(path, flags, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(locks.os, "open", refusing)
    with pytest.raises(LockError) as info:
        FileLock(tmp_path / "x.lock", setting="run_dir").try_acquire()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot create the lock file {tmp_path / 'x.lock'} ({os.strerror(code)}) on /")
    assert msg.endswith("set run_dir to one")
