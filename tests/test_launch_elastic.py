"""Real ``medfm launch`` processes (torchrun agents, gloo, ZeRO-3 on CPU).

* Two "nodes" on one machine: two ``medfm launch`` processes with ``--nnodes 2 --node-rank 0/1 --rdzv-endpoint
  127.0.0.1:PORT``, one worker each, train to completion. This is the uninterrupted reference.
* Faults, one node x 2 workers, ``--max-restarts 2``: rank 0 is SIGKILLed in the middle of saving checkpoint 4
  (partitions written, not complete), then, in the restarted attempt, rank 1 is SIGKILLed right after checkpoint 6.
  The first restart must resume from step 2 (the kill left step 4 incomplete and step 2 loadable), the second from
  step 6, and the final weights must equal the reference's exactly (fp32): no sample lost or repeated.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.world_env import env_outside_world  # noqa: E402

STEPS = 8
TIMEOUT = 420


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, shards: str, run_dir: Path) -> Path:
    cfg = run_config(run_dir, shards, [{"name": "mae:image"}, {"name": "contrastive:image-text"}],
                     ("image", "text"), batch=2, steps=STEPS, checkpoint={"every": 2, "keep": 10, "final": True})
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MEDFM_FAULT", None)
    env.update(extra)
    return env


def _launch_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "medfm.launch.cli", "launch", str(config), *args]


def _final_weights(run_dir: Path) -> dict:
    from medfm.pretrain.checkpoint import consolidate, model_state_dict

    return model_state_dict(consolidate(run_dir / "checkpoints"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_shards")
    return make_shards(root / "shards", n=16, modalities=("image", "text"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """The two-node run, uninterrupted."""
    tmp = tmp_path_factory.mktemp("launch_two_nodes")
    run_dir = tmp / "two_nodes"
    config = _config(tmp, shards, run_dir)
    endpoint = f"127.0.0.1:{_port()}"
    procs = [subprocess.Popen(_launch_cmd(config, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                                          "--rdzv-endpoint", endpoint),
                              env=_env(), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("two-node launch hung")
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {r} failed:\n{out[-4000:]}"
    return run_dir


@pytest.mark.slow
def test_two_nodes_train_to_completion(reference):
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step{STEPS}"
    assert (ckpts / f"step{STEPS}" / "COMPLETE").is_file()
    resolved = yaml.safe_load((reference / "config.yaml").read_text())
    assert resolved["train"]["steps"] == STEPS and resolved["run_dir"] == str(reference)
    # Per-rank logs from both agents (one worker each), and both launches recorded.
    logs = list((reference / "logs").glob("*/attempt_0/*/stderr.log"))
    assert len(logs) == 2, logs
    launches = (reference / "launches.jsonl").read_text().splitlines()
    assert len(launches) == 2


@pytest.mark.slow
def test_kill_in_save_and_after_checkpoint_resume_exactly(tmp_path, shards, reference):
    run_dir = tmp_path / "faulted"
    config = _config(tmp_path, shards, run_dir)
    faults = "kill-in-save:4:0:0,kill-after-checkpoint:6:1:1"
    try:
        proc = subprocess.run(_launch_cmd(config, "--nproc-per-node", "2", "--max-restarts", "2"),
                              env=_env(MEDFM_FAULT=faults), cwd=tmp_path, capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"faulted launch hung: {(exc.stdout or '')[-3000:]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # Both faults fired, each once, and each restart resumed from the right checkpoint.
    assert out.count("medfm fault injection: saving checkpoint step4") == 1, out[-6000:]
    assert out.count("medfm fault injection: checkpoint step6 complete") == 1, out[-6000:]
    assert "attempt 1: resuming from" in out and "step2" in out.split("attempt 1: resuming from")[1].split("\n")[0]
    assert "attempt 2: resuming from" in out and "step6" in out.split("attempt 2: resuming from")[1].split("\n")[0]
    attempts = sorted(p.name for p in next((run_dir / "logs").iterdir()).iterdir() if p.name.startswith("attempt_"))
    assert attempts == ["attempt_0", "attempt_1", "attempt_2"]
    # Exactly the uninterrupted run's weights.
    got, want = _final_weights(run_dir), _final_weights(reference)
    assert sorted(got) == sorted(want)
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want if not (got[k] == want[k]).all()}
    assert not diff, f"weights differ from the uninterrupted run: {diff}"


@pytest.mark.slow
def test_teardown_cannot_fail_a_finished_worker(tmp_path, shards):
    """gloo's threads sometimes abort a worker at interpreter exit after its run has finished ("terminate called
    without an active exception"; the kill test above failed 1 run in 3 that way, its last attempt's rank 1).
    ``abort-at-exit`` makes that abort certain: the launch must still succeed, without a restart."""
    run_dir = tmp_path / "teardown"
    config = _config(tmp_path, shards, run_dir)
    proc = subprocess.run(_launch_cmd(config, "train.steps=2", "--nproc-per-node", "2", "--max-restarts", "0"),
                          env=_env(MEDFM_FAULT="abort-at-exit:2:0"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert "aborts at interpreter exit" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step2"


@pytest.mark.slow
def test_teardown_cannot_fail_medfm_pretrain_under_a_users_torchrun(tmp_path, shards):
    """The same for ``torchrun -m medfm.launch.cli pretrain`` (the DESIGN contract's "one process of a torchrun
    world", and what gpu_check runs on a GPU): a finished rank that would abort at teardown exits 0."""
    run_dir = tmp_path / "own_torchrun"
    config = _config(tmp_path, shards, run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "medfm.launch.cli", "pretrain", str(config), "train.steps=2"]
    proc = subprocess.run(cmd, env=_env(MEDFM_FAULT="abort-at-exit:2:1"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert "aborts at interpreter exit" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step2"
