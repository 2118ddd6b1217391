"""Issue #16: one FLOP definition. What the trainer records (``train_flops`` in metrics.jsonl, the x-axis of the
scaling fits via launch/sweep.py's ``recorded_flops``) equals what the sweep plans with a priori
(``planned_sample_flops``: a ``compute:`` budget -> samples) for the same config. Before #16 the trainer used torch's
FlopCounterMode outside MAE-only runs and the sweep a lower-bound formula, and the sweep summed every objective even
when a round-robin plan ran one group per step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import from_dict  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("flops")
    return {"pair": make_shards(root / "pair", n=8, modalities=("image", "text"), prefix="pair"),
            "img": make_shards(root / "img", n=8, modalities=("image",), prefix="img")}


def _train_and_compare(cfg_dict) -> tuple[float, float, float]:
    """(per-sample FLOPs the sweep's x-axis reads back from the run, the sweep's planned per-sample FLOPs,
    per-step increments of the logged train_flops / samples) after training ``cfg_dict``."""
    from medfm.launch.sweep import read_metrics, recorded_flops
    from medfm.pretrain.step_flops import planned_sample_flops
    from medfm.pretrain.train import run

    planned = planned_sample_flops(from_dict(RunConfig, cfg_dict))
    res = run(from_dict(RunConfig, cfg_dict))
    by_step = read_metrics(cfg_dict["run_dir"])
    _, flops, seen = recorded_flops(by_step)
    assert res.train_flops == pytest.approx(flops, rel=1e-12) and seen > 0
    return flops / seen, planned, res


def test_trainer_flops_equal_the_sweeps_planned_flops_with_contrastive_and_caption(tmp_path, shards):
    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text"}, {"name": "caption:image"}]
    cfg = run_config(tmp_path / "run", shards["pair"], objectives, ("image", "text"), batch=4, steps=2,
                     train={"strategy": "ddp", "grad_accum": 2})
    cfg["data"]["collate"]["text_max_tokens"] = 12  # every report is longer: text is at its configured size
    recorded, planned, res = _train_and_compare(cfg)
    assert recorded == pytest.approx(planned, rel=1e-12), (recorded, planned)
    rows = [r for r in read_rows(tmp_path / "run") if "train_flops" in r]
    assert [r["flops_analytic"] for r in rows] == [1.0, 1.0]
    assert rows[0]["train_flops"] == pytest.approx(planned * 4 * 2, rel=1e-12)  # micro_batch x grad_accum


def test_round_robin_plan_is_planned_by_its_group_shares(tmp_path, shards):
    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text"}]
    cfg = run_config(tmp_path / "run", [shards["img"], shards["pair"]], objectives, ("image", "text"), batch=4,
                     steps=4, train={"strategy": "ddp"})
    cfg["data"]["sources"][0]["group"], cfg["data"]["sources"][1]["group"] = "img", "pair"
    cfg["data"]["plan"] = {"policy": "round_robin", "groups": [
        {"name": "img", "modalities": ["image"], "objectives": ["mae:image"]},
        {"name": "pair", "modalities": ["image", "text"], "objectives": ["contrastive:image-text"]}]}
    cfg["data"]["collate"]["text_max_tokens"] = 12
    recorded, planned, _ = _train_and_compare(cfg)  # 4 steps = 2 whole rounds
    assert recorded == pytest.approx(planned, rel=1e-12), (recorded, planned)


def test_lm_objective_is_flagged_as_not_covered():
    from types import SimpleNamespace

    from medfm.pretrain.objectives import ObjectiveConfig
    from medfm.pretrain.step_flops import formulas_cover

    assert formulas_cover([ObjectiveConfig("mae:image"), ObjectiveConfig("caption:image")])
    assert not formulas_cover([ObjectiveConfig("mae:image"), SimpleNamespace(kind="lm")])


def read_rows(run_dir):
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
