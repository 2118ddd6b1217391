"""Shared plumbing of the parity tests: where the peer environment is and how to run a script in it.

The references that need torchvision (open_clip) live in .venv-peers (``make peers``), because PyPI's torchvision
does not import beside .venv's local CPU torch wheel. A missing peer environment fails the test with the command
that builds it: a parity check that silently skips proves nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medfm.pretrain.world_env import env_outside_world

REPO = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO / "benchmarks" / "peers"
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEER_STAMP = REPO / ".venv-peers" / ".installed"


def peer_python() -> Path:
    """The peer interpreter, or a test failure that says how to build it."""
    if not (PEER_PYTHON.exists() and PEER_STAMP.exists()):
        pytest.fail(f"peer environment missing ({PEER_STAMP} not found): run `make peers` "
                    "(it installs open_clip + torchvision into .venv-peers; `make test` does this itself)",
                    pytrace=False)
    return PEER_PYTHON


def clean_env(**extra: str) -> dict:
    """Environment for a child process: one thread (2 shared cores), no inherited torchrun/venv variables."""
    env = {k: v for k, v in env_outside_world().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def run_script(python, script: Path, args, nproc: int = 1, timeout: float = 240.0, cwd=None) -> str:
    """Run ``script`` with ``python`` alone (nproc=1) or as a 2-process gloo world via torch.distributed.run.

    A timeout turns a hung collective into a test failure instead of a blocked CI; a non-zero exit fails with the
    child's output.
    """
    cmd = [str(python)]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(script), *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(),
                              cwd=str(cwd or REPO))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout:.0f}s\n{e.stdout or ''}\n{e.stderr or ''}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout


def medfm_python() -> str:
    return sys.executable
