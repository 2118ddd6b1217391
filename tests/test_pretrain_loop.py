"""The training loop's bookkeeping, in-process (a world of one, DDP strategy, seconds per test): skipped-sample
metrics by reason, cumulative train FLOPs (kept across resume;
the one FLOP definition shared with sweeps: test_pretrain_flops_definition.py), the public fault hook, and
the dependency direction of checkpoint reading (evals -> model_zoo, not pretrain)."""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402
from shards_loader_support import _npy, _tar_bytes  # noqa: E402

from medfm.pretrain import faults as faults_mod  # noqa: E402
from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.pretrain.faults import Fault, FaultInjector, parse_faults  # noqa: E402
from medfm.schema import ConfigError, from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAE = [{"name": "mae:image"}]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=8, modalities=("image", "text"))


def _run(cfg_dict):
    from medfm.pretrain.train import run

    return run(from_dict(RunConfig, cfg_dict))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _plant_bad_shard(out_dir: Path) -> None:
    """One extra shard with a garbage .npy sample and a wrong-shape sample, added to the manifest."""
    from medfm.shards.sample import encode_meta, make_meta

    img = {"image": {"photometric": "MONOCHROME2", "bits": 8, "shape": [16, 16, 1]}}
    members = []
    for key, payload in (("badnpy", b"\x93NUMPYgarbage"), ("badshape", _npy(np.zeros((16, 16), np.uint8)))):
        meta = make_meta(patient_id="p" + key, study_id="s" + key, split="train", source={"format": "test"},
                         modalities=["image"], **img)
        members += [(f"{key}.meta.json", encode_meta(meta)), (f"{key}.image.npy", payload)]
    data = _tar_bytes(members)
    (out_dir / "zbad-000000.tar").write_bytes(data)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["shards"].append({"name": "zbad-000000.tar", "samples": 2, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest(), "modalities": {"image": 2},
                               "splits": {"train": 2}})
    (out_dir / "manifest.json").write_text(json.dumps(manifest))


def test_skipped_samples_are_logged_per_reason(tmp_path):
    data = Path(make_shards(tmp_path / "shards", n=8, modalities=("image",)))
    _plant_bad_shard(data)
    cfg = run_config(tmp_path / "run", str(data), MAE, ("image",), batch=4, steps=6, train={"strategy": "ddp"})
    res = _run(cfg)
    assert res.status == "finished"
    last = _metrics(tmp_path / "run")[-1]
    # 10 samples per pass, 24 drawn: both bad samples were met (and replaced) at least twice
    assert last.get("skipped_bad_npy", 0) >= 2 and last.get("skipped_bad_shape", 0) >= 2, last


def test_train_flops_analytic_counted_and_kept_across_resume(tmp_path, shards):
    from medfm.model_zoo import create
    from medfm.model_zoo.flops import mae_forward_flops, train_flops
    from medfm.pretrain.objectives import DEFAULT_MASK_RATIO

    cfg = run_config(tmp_path / "run", shards, MAE, ("image", "text"), batch=4, steps=3,
                     train={"strategy": "ddp"}, checkpoint={"every": 1, "keep": 3})
    full = _run(cfg)
    f = from_dict(RunConfig, cfg)
    tower = create(f.model.towers["image"].arch, **f.model.towers["image"].overrides)
    d = f.model.mae_decoder
    per_step = 4 * train_flops(mae_forward_flops(tower, DEFAULT_MASK_RATIO["image"], (1, 16, 16), d.width, d.depth,
                                                 d.mlp_ratio))
    assert full.train_flops == pytest.approx(3 * per_step, rel=1e-12)
    rows = _metrics(tmp_path / "run")
    assert [r["flops_analytic"] for r in rows] == [1.0, 1.0, 1.0]
    assert rows[-1]["train_flops"] == pytest.approx(3 * per_step) and rows[-1]["mfu"] > 0
    client = json.loads((tmp_path / "run" / "checkpoints" / "step1" / "client" / "rank0.json").read_text())
    assert client["train_flops"] == pytest.approx(per_step)
    resumed = _run({**cfg, "checkpoint": {"every": 1, "keep": 3, "resume": "step1"}})
    assert resumed.train_flops == pytest.approx(full.train_flops, rel=1e-12)


class _Killed(Exception):
    pass


@pytest.fixture
def no_sigkill(monkeypatch):
    """The fault hook's SIGKILL replaced by an exception, so the test process survives to inspect the run dir."""
    def kill(reason, rank):
        raise _Killed(reason)

    monkeypatch.setattr(faults_mod, "_kill_self", kill)


def test_fault_spec_parsing_and_filtering():
    assert parse_faults("kill-in-save:4, kill-after-checkpoint:6:1:2") == [
        Fault("kill-in-save", 4), Fault("kill-after-checkpoint", 6, 1, 2)]
    assert parse_faults("") == []
    for bad in ("kill-in-save", "explode:3", "kill-in-save:x", "kill-in-save:1:2:3:4"):
        with pytest.raises(ValueError, match="MEDFM_FAULT"):
            parse_faults(bad)
    assert not FaultInjector(parse_faults("kill-in-save:4:1"), rank=0)  # another rank's fault
    assert not FaultInjector(parse_faults("kill-in-save:4:0:1"), rank=0, attempt=0)  # another attempt's
    assert FaultInjector(parse_faults("kill-in-save:4:0:1"), rank=0, attempt=1)


@pytest.mark.parametrize("mode, latest, complete", [("kill-in-save", "step1", ["step1"]),
                                                    ("kill-after-checkpoint", "step2", ["step1", "step2"])])
def test_fault_hook_fires_at_the_checkpoint(tmp_path, shards, monkeypatch, no_sigkill, mode, latest, complete):
    monkeypatch.setenv("MEDFM_FAULT", f"{mode}:2")
    cfg = run_config(tmp_path / "run", shards, MAE, ("image", "text"), steps=4, train={"strategy": "ddp"},
                     checkpoint={"every": 1, "keep": 5})
    with pytest.raises(_Killed):
        _run(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == latest
    assert sorted(p.parent.name for p in ckpts.glob("step*/COMPLETE")) == complete
    if mode == "kill-in-save":  # partitions written, no client state, not complete
        assert (ckpts / "step2" / "model.safetensors").is_file()
        assert not (ckpts / "step2" / "client" / "rank0.json").exists()
    assert len(_metrics(tmp_path / "run")) == 2  # step 3 never trained


def test_bad_fault_spec_is_a_config_error(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("MEDFM_FAULT", "kill-everything:2")
    cfg = run_config(tmp_path / "run", shards, MAE, ("image", "text"), steps=1, train={"strategy": "ddp"})
    with pytest.raises(ConfigError, match="unknown mode"):
        _run(cfg)


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


def test_checkpoint_reading_lives_in_model_zoo():
    """DESIGN.md: evals -> {model_zoo, shards}; model_zoo never imports training code."""
    for part in ("evals", "model_zoo"):
        for path in sorted((ROOT / part).glob("*.py")):
            bad = sorted(m for m in _imports(path) if m.startswith(("medfm.pretrain", "medfm.launch")))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    from medfm.model_zoo import checkpoint_io
    from medfm.pretrain import checkpoint

    assert checkpoint.consolidate is checkpoint_io.consolidate  # kept for compatibility
    assert checkpoint.model_state_dict is checkpoint_io.model_state_dict
