"""A real one-node SLURM cluster for tests: the ``slurm_cluster`` fixture and job helpers.

The cluster is launch/slurm_local.sh's (munged, slurmctld, slurmd from Debian's packages, in MEDFM_SLURM_DIR, default
/tmp/medfm-slurm). The fixture starts it when it is not up and stops it at the end of the session only if it started
it (a cluster someone brought up with ``make slurm-up`` stays up). Missing packages or a cluster that does not start
fail the test with the script's one-line reason: never a skip (CI installs the packages, see .ci/run).

tests/conftest.py imports the fixture, so any test can name it::

    def test_x(slurm_cluster):
        job = slurm_cluster.submit(script)
        job.wait(lambda s: s["JobState"] == "COMPLETED")
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from medfm.pretrain.world_env import env_outside_world

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "slurm_local.sh"
DIR = Path(os.environ.get("MEDFM_SLURM_DIR", "/tmp/medfm-slurm"))
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")


def _script(cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**env_outside_world(), "MEDFM_SLURM_DIR": str(DIR)}
    return subprocess.run([str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout)


def run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """A SLURM client command against this cluster."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env_outside_world())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class Job:
    id: str

    def info(self) -> dict:
        """``scontrol show job -o`` as a dict (JobState, Restarts, TimeLimit, ExitCode, StdOut, ...)."""
        out = run("scontrol", "show", "job", "-o", self.id).stdout
        fields = {}
        for word in out.split():
            key, eq, value = word.partition("=")
            if eq:
                fields[key] = value
        return fields

    def wait(self, until, timeout: float = 300, poll: float = 0.5) -> dict:
        """Poll until ``until(info)`` is true; fail with the job's state (and log tail) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if until(info):
                return info
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id}: still {info.get('JobState')} (restarts {info.get('Restarts')}) after "
                            f"{timeout:.0f} s; log tail:\n{self.log_tail(info)}", pytrace=False)
            time.sleep(poll)

    def wait_finished(self, timeout: float = 300) -> dict:
        return self.wait(lambda i: i.get("JobState") in FINISHED, timeout)

    def log_tail(self, info: dict | None = None, n: int = 4000) -> str:
        path = Path((info or self.info()).get("StdOut", ""))
        return path.read_text(errors="replace")[-n:] if path.is_file() else f"(no log at {path})"

    def start_now(self, **updates: str) -> None:
        """Release a pending (e.g. requeued) job at once instead of after SLURM's requeue delay, with updates.

        SLURM's requeue delay is what normally keeps a requeued job from starting while slurmd still holds the
        revoked credential of its previous attempt (slurmd compares whole seconds: a start in the same second is
        "Killing non-startable batch job: Job credential revoked", the job ends FAILED). Released early, it waits
        for the node to finish cleaning up that attempt and for the clock to pass the revocation's second."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if states and all(s.rstrip("*~#") == "idle" for s in states):
                break
            time.sleep(0.5)
        time.sleep(2.0)
        run("scontrol", "update", f"JobId={self.id}", "StartTime=now", *(f"{k}={v}" for k, v in updates.items()))


@dataclass
class Cluster:
    dir: Path
    conf: Path

    def submit(self, script, *sbatch_args: str) -> Job:
        out = run("sbatch", "--parsable", *sbatch_args, str(script), timeout=60).stdout.strip()
        return Job(out.split(";")[0])


@pytest.fixture(scope="session")
def slurm_cluster():
    if not SCRIPT.is_file():
        pytest.fail(f"{SCRIPT} is missing", pytrace=False)
    started = _script("status").returncode != 0
    if started:
        proc = _script("up")
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            pytest.fail(f"no SLURM cluster: {reason}", pytrace=False)
    conf = DIR / "slurm.conf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            yield Cluster(DIR, conf)
        finally:
            if started:
                _script("down")
