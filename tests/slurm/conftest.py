"""pytest plumbing for the SLURM tests: one real cluster per test session.

`slurm_cluster` (session scope) runs `tests/slurm/cluster.sh install` and `up` once, exports the
client environment (SLURM_CONF, and this folder on PYTHONPATH so jobs can unpickle
tests/slurm/slurm_jobs.py) into os.environ — submitit calls sbatch/sacct/scancel as subprocesses
that inherit it — and runs `down` at the end of the session.

To run against an existing cluster instead (nothing is installed, started or stopped):
    SDCA_SLURM_EXTERNAL=1 SLURM_CONF=/path/to/slurm.conf \
    SDCA_SLURM_PARTITION_LOW=... SDCA_SLURM_PARTITION_HIGH=... pytest tests/slurm
SDCA_SLURM_KEEP=1 leaves the local cluster running after the session (for debugging).

Several test sessions may run at once on a shared machine: each holds an flock on
`<state dir>.lock` for its whole session, and a session that finds /tmp/sdca-slurm taken uses
/tmp/sdca-slurm-1 (ports 17010-17014), -2, ... instead of stopping the other session's cluster.
Setting SDCA_SLURM_DIR / SDCA_SLURM_PORT_BASE pins one slot (and waits for its lock).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"


@dataclass
class SlurmCluster:
    """What a test needs to talk to the cluster. `env` holds the variables clients need."""

    conf_path: Path
    env: dict[str, str]
    state_dir: Path | None
    low_partition: str = "low"
    high_partition: str = "high"
    external: bool = False
    nodes: tuple[str, ...] = ("n1", "n2")
    _submitted: list[str] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sinfo, sacct, scancel...) against this cluster."""
        proc = subprocess.run(
            list(args), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
        return proc

    def track(self, job_id: str) -> str:
        """Remember a job id so that `cancel_tracked` can scancel it at teardown."""
        self._submitted.append(str(job_id))
        return str(job_id)

    def cancel_tracked(self) -> None:
        if self._submitted:
            self.run("scancel", *self._submitted, check=False)
            self._submitted.clear()

    def sacct(self, job_id: str, duplicates: bool = False) -> list[dict[str, str]]:
        """Allocation-level accounting records of a job (with -D: also each requeued run)."""
        fields = "JobID,State,ExitCode,NodeList,Partition,Start,End,NNodes,NTasks,AllocCPUS"
        args = ["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", fields]
        if duplicates:
            args.append("-D")
        out = self.run(*args).stdout
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]

    def task_state(self, array_id: str, index: int) -> str:
        """sacct's state of task ``index`` of job array ``array_id``: its own row, or, for a task
        SLURM never split out of the array's pending record (an array it cancelled whole), the
        array's row ``<id>_[0-1]`` whose index list holds it (or, until slurmdbd has that
        record's task list, its only row, named ``<id>``). ``-j <id>_<index>`` would find no row
        at all for such a task."""
        rows = self.sacct(array_id)
        own = [r["State"] for r in rows if r["JobID"] == f"{array_id}_{index}"]
        if own:
            return own[-1]
        for r in rows:
            m = re.fullmatch(rf"{array_id}_\[([\d,\-]+)(?:%\d+)?\]", r["JobID"])
            spans = [part.partition("-") for part in m.group(1).split(",")] if m else []
            if any(int(lo) <= index <= int(hi or lo) for lo, _, hi in spans):
                return r["State"]
        if [r["JobID"] for r in rows] == [array_id]:  # the same record before slurmdbd has its task list
            return rows[0]["State"]
        raise AssertionError(f"sacct has no record of task {index} of job array {array_id}: {rows}")

    def wait_sacct_state(self, job_id: str, states: set[str], timeout_s: float, what: str) -> str:
        """Poll sacct until the job's (last) record is in `states`; fail with the last seen state."""
        end = time.monotonic() + timeout_s
        last = "no record"
        while time.monotonic() < end:
            recs = self.sacct(job_id)
            if recs:
                last = recs[-1]["State"].split()[0]
                if last in states:
                    return last
            time.sleep(1)
        raise AssertionError(f"{what}: job {job_id} not in {sorted(states)} after {timeout_s:.0f}s (sacct says {last})")

    def wait_done(self, job, timeout_s: float, what: str) -> None:
        """Wait for a submitit job to finish; on timeout cancel it and fail with its log tail."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if job.done(force_check=True):
                return
            time.sleep(1)
        state = job.get_info(mode="force").get("State", "?")
        self.run("scancel", str(job.job_id), check=False)
        raise AssertionError(
            f"{what}: job {job.job_id} not done after {timeout_s:.0f}s (state {state})\n{log_tail(job)}"
        )


def log_tail(job, lines: int = 30) -> str:
    """Last lines of a submitit job's stdout/stderr (rank 0), for failure messages."""
    parts = []
    for name in ("stdout", "stderr"):
        path = getattr(job.paths, name)
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"---- {path}:\n" + "\n".join(text))
        else:
            parts.append(f"---- {path}: (missing)")
    return "\n".join(parts)


def _script(verb: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), verb], env=env, capture_output=True, text=True, timeout=timeout)


def _claim_slot(slots: int = 4) -> tuple[dict[str, str], object]:
    """Pick a state folder + port range no other live test session holds; lock it for the session."""
    env = dict(os.environ)
    env.pop("SLURM_CONF", None)
    pinned = "SDCA_SLURM_DIR" in env or "SDCA_SLURM_PORT_BASE" in env
    base_dir = env.get("SDCA_SLURM_DIR", "/tmp/sdca-slurm")
    base_port = int(env.get("SDCA_SLURM_PORT_BASE", "17000"))
    for slot in range(1 if pinned else slots):
        state = base_dir if slot == 0 else f"{base_dir}-{slot}"
        lock = open(state + ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if pinned else fcntl.LOCK_NB))
        except BlockingIOError:
            lock.close()
            continue
        env["SDCA_SLURM_DIR"] = state
        env["SDCA_SLURM_PORT_BASE"] = str(base_port + 10 * slot)
        env["SDCA_SLURM_LOCK_HELD"] = "1"  # cluster.sh: we hold the slot's lock
        return env, lock
    pytest.fail(
        f"all {slots} SLURM test cluster slots ({base_dir}, {base_dir}-1, ...) are held by other test sessions",
        pytrace=False,
    )


def _external_cluster() -> SlurmCluster:
    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        raise pytest.UsageError("SDCA_SLURM_EXTERNAL=1 needs SLURM_CONF pointing at the cluster's slurm.conf")
    return SlurmCluster(
        conf_path=Path(conf),
        env={"SLURM_CONF": conf},
        state_dir=None,
        external=True,
        low_partition=os.environ.get("SDCA_SLURM_PARTITION_LOW", "low"),
        high_partition=os.environ.get("SDCA_SLURM_PARTITION_HIGH", "high"),
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real SLURM cluster (2 nodes n1, n2; partitions low/high) for the whole test session."""
    if os.environ.get("SDCA_SLURM_EXTERNAL") == "1":
        cluster = _external_cluster()
    else:
        env, lock = _claim_slot()
        for verb, limit in (("install", 900), ("up", 300)):
            proc = _script(verb, env, limit)
            if proc.returncode != 0:
                if verb == "up":
                    _script("down", env, 120)  # stop whatever part of the cluster did start
                lock.close()
                pytest.fail(
                    f"tests/slurm/cluster.sh {verb} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False,
                )
        exported = dict(
            line.removeprefix("export ").split("=", 1)
            for line in _script("env", env, 30).stdout.splitlines()
            if line.startswith("export ")
        )
        cluster = SlurmCluster(
            conf_path=Path(exported["SLURM_CONF"]),
            env={"SLURM_CONF": exported["SLURM_CONF"]},
            state_dir=Path(exported["SDCA_SLURM_DIR"]),
        )
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    cluster.env["PYTHONPATH"] = pythonpath
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        cluster.cancel_tracked()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not cluster.external:
            if os.environ.get("SDCA_SLURM_KEEP") != "1":
                proc = _script("down", env, 120)
                if proc.returncode != 0:
                    print(f"tests/slurm/cluster.sh down failed: {proc.stderr}")
            lock.close()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session cluster, cancelling every job the test tracked when the test ends."""
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_tracked()
