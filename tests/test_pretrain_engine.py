"""Real ZeRO-3 worlds of 2 CPU processes (torchrun, gloo) running the real loader and model_zoo towers.

One torchrun world checks several properties to keep CI time small:
- 30 steps with a checkpoint every 5, then a resume from step 15: steps 16-30 identical in fp32;
- parameters really partitioned (persistence threshold 0): per-rank bytes about half of the full model;
- consolidation (zero_to_fp32) equals the live, gathered weights;
- every objective's loss falls on the learnable task;
- a mixed-modality run where ranks hold different modalities completes (a hang fails via the timeout), built under
  deepspeed.zero.Init with initial weights identical to an ordinary build of the same seed;
- the NaN guard skips non-finite steps and stops after K, naming the objective, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.world_env import env_outside_world  # noqa: E402

HELPER = str(Path(__file__).parent / "pretrain_support.py")


def torchrun(spec: dict, tmp_path: Path, timeout: int = 420) -> list[dict]:
    spec_path = tmp_path / "spec.json"
    spec["out"] = str(tmp_path / "report")
    spec_path.write_text(json.dumps(spec))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HELPER,
           str(spec_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun world hung (> {timeout} s): {(exc.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_zero3_resume_partition_consolidate_objectives_mixed_nan(tmp_path):
    shards = make_shards(tmp_path / "shards", n=32)
    # Ranks see different modalities in the same step: even samples image+text, odd ones signal+ehr.
    mixed = make_shards(tmp_path / "mixed", n=16, prefix="mx",
                        modality_of=lambda i: ("image", "text") if i % 2 == 0 else ("signal", "ehr"))
    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text"}, {"name": "caption:image"},
                  {"name": "mae:signal", "weight": 0.5}, {"name": "contrastive:signal-ehr", "loss": "siglip"}]
    mods = ("image", "signal", "ehr", "text")
    full = run_config(tmp_path / "full", shards, objectives, mods, batch=4, steps=30,
                      checkpoint={"every": 5, "keep": 10})
    resumed = run_config(tmp_path / "full", shards, objectives, mods, batch=4, steps=30,
                         checkpoint={"every": 5, "keep": 10, "resume": "step15"})
    # Built under deepspeed.zero.Init (never whole on one rank), the same initial values as an ordinary build.
    mixed_cfg = run_config(tmp_path / "mixed_run", mixed, objectives, mods, batch=2, steps=4,
                           zero={"zero_init": True})
    nan_cfg = run_config(tmp_path / "nan_run", shards, objectives[:2], ("image", "text"), batch=4, steps=8,
                         optim={"lr": 1e30, "grad_clip": 0.0}, train={"nan_guard": 2},
                         checkpoint={"every": 1, "keep": 2})
    ranks = torchrun({"phases": [{"config": full}, {"config": resumed, "inspect": True}, {"config": mixed_cfg, "compare_init": True},
                                 {"config": nan_cfg}]}, tmp_path)
    for r, rep in enumerate(ranks):
        full_run, resume_run, mixed_run, nan_run = rep["phases"]
        # Bit-exact resume: steps 16..30 identical to the uninterrupted run.
        assert full_run["status"] == "finished" and full_run["step"] == 30
        assert [x["step"] for x in resume_run["losses"]] == list(range(16, 31))
        assert resume_run["losses"] == full_run["losses"][15:], f"rank {r}: resumed losses differ"
        # Partitioned: each rank holds about half of the parameter bytes (threshold 0).
        ratio = resume_run["local_bytes"] / resume_run["full_bytes"]
        assert 0.45 <= ratio <= 0.55, f"rank {r}: per-rank/full parameter bytes {ratio:.3f}"
        assert mixed_run["status"] == "finished" and mixed_run["step"] == 4
        assert all(math.isfinite(v) for x in mixed_run["losses"] for k, v in x.items() if k != "step")
        assert mixed_run["init_keys_differ"] == [] and mixed_run["init_max_diff"] == 0.0, mixed_run["init_max_diff"]
        assert 0.45 <= mixed_run["zero_init_local_ratio"] <= 0.55
        # NaN guard: step 1 is finite (and checkpointed); then non-finite steps, stop after 2 in a row.
        assert nan_run["status"] == "nan_stop", nan_run
        assert nan_run["skipped"] == 2 and nan_run["step"] == 3
        assert "mae:image" in nan_run["message"] and "step1" in nan_run["message"]
    rep0 = ranks[0]["phases"][1]
    assert rep0["consolidated_missing"] == [], rep0["consolidated_missing"]
    assert rep0["consolidated_max_diff"] == 0.0 and rep0["finite"]
    losses = ranks[0]["phases"][0]["losses"]
    for name in [o["name"] for o in objectives]:
        first = sum(x[name] for x in losses[:5]) / 5
        last = sum(x[name] for x in losses[-5:]) / 5
        assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"
    assert (tmp_path / "nan_run" / "checkpoints" / "latest").read_text() == "step1"
    assert (tmp_path / "nan_run" / "checkpoints" / "step1" / "COMPLETE").is_file()
    assert not list((tmp_path / "full" / "checkpoints").glob("step*/COMPLETE")) == []
