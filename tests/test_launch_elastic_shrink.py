"""Real elasticity: ``medfm launch --nnodes 1:2`` on two "nodes" (two launch processes, one worker each); after the
first checkpoint one node is killed outright (its agent and worker, SIGKILL). The remaining node's agent restarts
with a world of one, which resumes the world-size-2 ZeRO-3 checkpoint (re-partitioned through a universal checkpoint,
global batch kept) and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.world_env import env_outside_world  # noqa: E402

STEPS = 16
TIMEOUT = 480


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun agents start their workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(pid: int) -> None:
    for p in reversed(_tree(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_node_killed_run_finishes_on_the_other(tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, modalities=("image", "text"))
    run_dir = tmp_path / "elastic"
    cfg = run_config(run_dir, shards, [{"name": "contrastive:image-text"}], ("image", "text"), batch=2, steps=STEPS,
                     checkpoint={"every": 2, "keep": 10, "final": True})
    config = tmp_path / "elastic.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MEDFM_FAULT", None)
    endpoint = f"127.0.0.1:{_port()}"
    cmd = [sys.executable, "-m", "medfm.launch.cli", "launch", str(config), "--nnodes", "1:2", "--nproc-per-node",
           "1", "--rdzv-endpoint", endpoint, "--max-restarts", "3"]
    node0 = subprocess.Popen([*cmd, "--node-rank", "0"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(8)  # node 0's agent binds the rendezvous store first (it must outlive node 1)
    node1 = subprocess.Popen([*cmd, "--node-rank", "1"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        first = run_dir / "checkpoints" / "step2" / "COMPLETE"
        while not first.is_file():
            assert time.time() < deadline and node0.poll() is None, "no first checkpoint"
            time.sleep(0.1)
        _kill_tree(node1.pid)  # the whole "node": launch, torchrun agent and worker
        out = node0.communicate(timeout=max(1, deadline - time.time()))[0]
    except subprocess.TimeoutExpired:
        pytest.fail("the remaining node did not finish")
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                _kill_tree(p.pid)
    assert node0.returncode == 0, out[-6000:]
    done = json.loads((run_dir / "checkpoints" / f"step{STEPS}" / "COMPLETE").read_text())
    assert done["world_size"] == 1, done
    assert "of world size 2 at world size 1" in out, out[-4000:]
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"step"' in ln]
    assert steps[-1] == STEPS
