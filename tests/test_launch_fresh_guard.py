"""A fresh launch into a run directory that holds checkpoints is refused unless it asks to resume: ``medfm launch``
refuses before torchrun starts (exit 2, one line, checkpoints untouched), and the worker's first attempt no longer
adds checkpoint.resume=latest on its own (it used to, which bypassed pretrain's fresh-run guard); restarts and SLURM
requeues of the same launch still resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.launch.cli import main  # noqa: E402


@pytest.fixture
def run_with_checkpoint(tmp_path):
    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(tmp_path / "run", shards, [{"name": "contrastive:image-text"}], ("image", "text"), batch=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    step = tmp_path / "run" / "checkpoints" / "step2"
    (step / "client").mkdir(parents=True)
    (step / "COMPLETE").write_text('{"world_size": 2, "step": 2}')
    (step / "client" / "rank0.json").write_text('{"step": 2}')
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step2")
    return path, step


def test_fresh_launch_into_checkpoints_is_refused(run_with_checkpoint, capsys):
    path, step = run_with_checkpoint
    assert main(["launch", str(path), "--nproc-per-node", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints (step2)" in err[0] and "checkpoint.resume=latest" in err[0]
    assert (step / "COMPLETE").is_file()
    assert main(["launch", str(path), "checkpoint.resume=latest", "--nproc-per-node", "2", "--dry-run"]) == 0


@pytest.mark.parametrize("env, overrides, resumes", [
    ({}, [], False),                                    # attempt 0 of a fresh launch: pretrain's guard decides
    ({"TORCHELASTIC_RESTART_COUNT": "1"}, [], True),     # torchrun's restart of this launch
    ({"SLURM_RESTART_COUNT": "1"}, [], True),            # a SLURM requeue of the same job
    ({}, ["checkpoint.resume=latest"], True),            # asked to
])
def test_worker_resumes_only_on_restart_or_when_asked(run_with_checkpoint, monkeypatch, env, overrides, resumes):
    import medfm.pretrain.cli
    from medfm.launch import worker

    path, _ = run_with_checkpoint
    for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = []
    monkeypatch.setattr(medfm.pretrain.cli, "train_and_report", lambda cfg: seen.append(cfg) or 0)
    assert worker.main([str(path), *overrides]) == 0
    assert (seen[0].checkpoint.resume == "latest") == resumes, seen[0].checkpoint
