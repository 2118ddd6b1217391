"""Exact resume for every objective mix that ships, in-process (a world of one, DDP): a run resumed from its
step-2 checkpoint yields the uninterrupted run's losses and final weights bit for bit. The ZeRO-3 and 2-rank
versions (with rank kills) are in test_launch_resume_kills.py (slow).

Defect this pins (issue #17, step 21 loss 3.06833 vs 3.07120): with ``train.peak_tflops: 0`` (the tiny_cpu and
demo recipes) the loop measured the device's matmul peak with ``torch.randn`` *after* restoring the checkpoint's
RNG state, so the first resumed step drew other MAE masks / dropout than the uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import from_dict  # noqa: E402

MIXES = {
    "mae": [{"name": "mae:image"}],
    "contrastive": [{"name": "contrastive:image-text"}],
    "caption": [{"name": "caption:image"}],
    "all": [{"name": "mae:image"}, {"name": "contrastive:image-text"}, {"name": "caption:image", "weight": 0.5}],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("resume_shards"), n=12, modalities=("image", "text"))


def _run(cfg_dict):
    from medfm.pretrain.train import run

    return run(from_dict(RunConfig, cfg_dict))


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "step4" / "model.safetensors"))


@pytest.mark.parametrize("mix, accum", [("mae", 1), ("contrastive", 1), ("caption", 1), ("all", 1), ("all", 2)])
def test_resume_is_bit_exact_for_every_objective_mix(tmp_path, shards, mix, accum):
    cfg = run_config(tmp_path / "run", shards, MIXES[mix], ("image", "text"), batch=2, steps=4,
                     train={"strategy": "ddp", "grad_accum": accum, "peak_tflops": 0.0},
                     checkpoint={"every": 2, "keep": 3, "final": True},
                     optim={"warmup_steps": 2, "min_lr_ratio": 0.1})
    cfg["model"]["towers"]["text"]["overrides"]["hidden_dropout"] = 0.1  # RNG in the step, as HF BERT has
    first = _run(cfg)
    want = _weights(tmp_path / "run")
    resumed = _run({**cfg, "checkpoint": {**cfg["checkpoint"], "resume": "step2"}})
    assert resumed.losses == first.losses[2:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the replayed steps' rows replaced, not appended
    got = _weights(tmp_path / "run")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_zero3_resume_is_exact_with_a_plan_that_skips_towers(tmp_path, accum):
    """ZeRO-3, world of one, the shrunk demo recipe (round-robin groups: each step runs one tower of three). Old
    defect: DeepSpeed re-applied the skipped towers' stale gradients, a resumed run (zeroed buffer) did not."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from pretrain_support import demo_like_config

    cfg = demo_like_config(tmp_path / "shards", tmp_path / "run", steps=6, every=3)
    cfg["data"]["num_workers"] = 0
    cfg["train"]["grad_accum"] = accum
    first = _run(cfg)
    resumed = _run({**cfg, "checkpoint": {**cfg["checkpoint"], "resume": "step3"}})
    assert resumed.losses == first.losses[3:]
