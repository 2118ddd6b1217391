"""Nothing in a checkpoint is unpickled: a crafted pickle in each file position of a real ZeRO-3 checkpoint (model
states, optimizer states, client state) is refused with one line and executes nothing — on resume (DeepSpeed's
load_checkpoint asks torch.load for weights_only=False), eval, release and consolidate."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.world_env import env_outside_world  # noqa: E402

ENV = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
MEDFM = [sys.executable, "-m", "medfm.launch.cli"]
POSITIONS = {"model": "zero_pp_rank_0_mp_rank_00_model_states.pt", "optim": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "client": "client/rank0.json"}


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a hostile checkpoint does on unpickling: run code (here: create a file)
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory):
    """A real ZeRO-3 checkpoint (world of one, 2 steps) and the config that wrote it."""
    root = tmp_path_factory.mktemp("pickle")
    shards = make_shards(root / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(root / "run", shards, [{"name": "contrastive:image-text"}], ("image", "text"), steps=2,
                     checkpoint={"every": 0, "final": True})
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*MEDFM, "pretrain", str(path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "run" / "checkpoints" / "step2" / POSITIONS["optim"]).is_file()
    return root, cfg


def _poisoned(root: Path, cfg: dict, position: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the run whose ``position`` file is a crafted pickle; (run dir, its config, the marker)."""
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "step2" / POSITIONS[position]
    assert target.is_file(), target  # a real file of the checkpoint is replaced, not a new one added
    torch.save({"module": _Payload(str(marker)), "payload": _Payload(str(marker))}, target)
    c = {**cfg, "run_dir": str(run)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(c))
    return run, path, marker


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("medfm")]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("position", list(POSITIONS))
def test_resume_refuses_a_crafted_pickle(zero3_checkpoint, tmp_path, position):
    root, cfg = zero3_checkpoint
    run, path, marker = _poisoned(root, cfg, position, tmp_path)
    proc = subprocess.run([*MEDFM, "pretrain", str(path), "checkpoint.resume=latest", "train.steps=3"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the checkpoint's pickle ran code on resume"
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert "refused" in line and ("unpickling" in line or "not JSON" in line), line


def test_resume_of_an_untouched_checkpoint_still_loads(zero3_checkpoint, tmp_path):
    root, cfg = zero3_checkpoint
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run_dir": str(run)}))
    proc = subprocess.run([*MEDFM, "pretrain", str(path), "checkpoint.resume=latest", "train.steps=3"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step3" / "COMPLETE").is_file()


@pytest.mark.parametrize("position", list(POSITIONS))
def test_eval_release_consolidate_refuse_a_crafted_pickle(zero3_checkpoint, tmp_path, position, capsys):
    from medfm.evals.features import ModelSourceError, load_model
    from medfm.launch.cli import main
    from medfm.model_zoo.checkpoint_io import consolidate

    root, cfg = zero3_checkpoint
    run, _, marker = _poisoned(root, cfg, position, tmp_path)
    with pytest.raises(ModelSourceError, match="refused") as exc:
        load_model(run / "checkpoints")
    assert "\n" not in str(exc.value)
    capsys.readouterr()
    assert main(["release", str(run), "--name", "x", "--version", "1", "--zoo", str(tmp_path / "zoo")]) == 2
    assert "refused" in _one_line(capsys.readouterr().err)
    if position != "client":  # consolidate reads DeepSpeed's files only
        with pytest.raises(ValueError, match="refused") as exc:
            consolidate(run / "checkpoints")
        assert "\n" not in str(exc.value)
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert torch.load.__module__ == "torch.serialization"  # the forced-weights_only wrapper is gone again
