"""``medfm pretrain`` alone (world of one, ZeRO-3 on CPU) stops cleanly on SIGTERM (medfm.pretrain.preemption): it
ends the current step, writes a checkpoint of that step and exits 0, without ``requeue.json`` (a SIGTERM is a cancel
or SLURM's own preemption: the batch script must not requeue). SIGUSR1's path, with the requeue, is proven against a
real cluster in test_launch_slurm.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.preemption import MARKER  # noqa: E402
from medfm.pretrain.world_env import env_outside_world  # noqa: E402

STEPS = 400  # far more than run before the signal lands: the run must stop early


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("preempt_shards") / "shards", n=8, modalities=("image",))


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_stops_without_requeue(tmp_path, shards):
    sig = signal.SIGTERM
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, shards, [{"name": "mae:image"}], ("image",), batch=2, steps=STEPS,
                     train={"log_every": 1}, checkpoint={"every": 0, "keep": 2, "final": True})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # A lone `medfm pretrain`: not the world of one an earlier in-process test left in this process's environment.
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medfm.launch.cli", "pretrain", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        seen = len(metrics.read_text().splitlines())
        proc.send_signal(sig)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    name = signal.Signals(sig).name
    line = next((x for x in out.splitlines() if "stopped after step" in x), None)
    assert line and f" on {name}: checkpoint step" in line, out[-3000:]
    step = int(line.split("stopped after step ")[1].split()[0])
    assert seen <= step < STEPS
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step{step}" and (ckpts / f"step{step}" / "COMPLETE").is_file()
    assert not (run_dir / MARKER).exists()
