"""Periodic eval inside a real 2-rank ZeRO-3 pretraining run (torchrun, gloo, CPU): zero-shot prompt encoding,
its logit scale and report generation run the same forwards on every rank (old code: the prompts were encoded on rank
0 alone against partitioned parameters, and generation stopped early per rank, so the world hung)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.world_env import env_outside_world  # noqa: E402

HELPER = str(Path(__file__).parent / "pretrain_support.py")
CAPTIONS = ["left effusion", "normal study", "cardiomegaly", "rib fracture"]  # make_sample's text by class


@pytest.mark.slow
def test_periodic_eval_under_zero3_with_two_ranks(tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, modalities=("image", "text"))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"templates": ["{}"], "classes": {f"c{k}": [t] for k, t in enumerate(CAPTIONS)}}))
    data = {"dir": shards, "train": "train", "val": None, "test": "train"}
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "hook", "tasks": [
        {"name": "zs", "data": data, "modality": "image", "kind": "multiclass", "label": "cls",
         "classes": [f"c{k}" for k in range(4)], "protocol": "zeroshot", "prompts": str(prompts)},
        {"name": "gen", "data": data, "modality": "image", "kind": "generation", "protocol": "generation",
         "options": {"max_new_tokens": 12}, "max_samples": 7},  # 7 on 2 ranks: uneven shares, padded batch
        {"name": "ret", "data": data, "modality": "image", "protocol": "retrieval"}]}))
    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text"}, {"name": "caption:image"}]
    cfg = run_config(tmp_path / "run", shards, objectives, ("image", "text"), batch=4, steps=2,
                     eval={"every": 2, "hook": "medfm.evals.hook:periodic_eval"})
    spec = {"phases": [{"config": cfg}], "out": str(tmp_path / "report")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MEDFM_EVAL_SUITE": str(suite)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HELPER,
           str(tmp_path / "spec.json")]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-rank ZeRO-3 run with periodic eval hung (> 420 s): {(exc.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((tmp_path / "run" / "evals" / "step2" / "report.json").read_text())
    status = {t["task"]: (t["status"], t["error"]) for t in report["tasks"]}
    assert status == {"zs": ("ok", ""), "gen": ("ok", ""), "ret": ("ok", "")}, status
    metrics = {(r["task"], r["metric"]) for r in report["results"] if r["value"] is not None}
    assert ("zs", "accuracy") in metrics and ("gen", "bleu4") in metrics and ("ret", "recall@1") in metrics
    gen = next(t for t in report["tasks"] if t["task"] == "gen")
    assert gen["info"]["n"] == 7  # every sample decoded exactly once across the two ranks
    # the end-of-training MAE figure also runs its forwards on both ranks (tower and decoder gathered)
    assert (tmp_path / "run" / "mae_image.png").is_file()
