"""The bf16 policy (pretrain/precision.py): what is cast, fp32 master weights under DDP, DDP == ZeRO-3 numerics."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain import precision  # noqa: E402
from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import from_dict  # noqa: E402

OBJ = [{"name": "contrastive:signal-ehr"}, {"name": "mae:signal", "weight": 0.5}]
MODS = ("signal", "ehr")


def test_only_modality_values_are_cast():
    batch = {"image": torch.rand(2, 1, 4, 4), "volume": torch.rand(2, 1, 2, 4, 4), "signal": torch.rand(2, 2, 8),
             "ehr_times": torch.tensor([[-1000.3, 0.25]]), "ehr_values": torch.tensor([[7.31, 140.2]]),
             "ehr_codes": torch.tensor([[3, 4]]), "ehr_valid": torch.tensor([[True, True]]),
             "text_ids": torch.tensor([[5, 6]]), "signal_leads": torch.tensor([[0, 1]]),
             "image_present": torch.tensor([True, False]), "labels": {"cls": torch.tensor([1.0, 2.0])},
             "keys": ["a", "b"]}
    out = precision.batch_to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert {k for k, v in out.items() if torch.is_tensor(v) and v.dtype == torch.bfloat16} == set(precision.CAST_KEYS)
    assert torch.equal(out["ehr_times"], batch["ehr_times"]) and torch.equal(out["ehr_values"], batch["ehr_values"])
    assert out["labels"] is batch["labels"] and out["keys"] == ["a", "b"]


def test_ehr_time_features_survive_a_bf16_module():
    """DeepSpeed's bf16 mode casts the module (buffers too): the sin-cos time features must stay those of fp32."""
    from medfm.model_zoo.ehr import EHRConfig, EHRTransformer

    torch.manual_seed(0)
    tower = EHRTransformer(EHRConfig(vocab_size=12, width=32, depth=1, num_heads=2, time_features=16))
    codes, times = torch.tensor([[2, 3, 4]]), torch.tensor([[-1000.3, -20.7, 0.0]])
    ref_tower = EHRTransformer(tower.cfg)
    # the same bf16-rounded weights, computing in fp32 (state_dict: parameters only, so no buffer is rounded)
    ref_tower.load_state_dict({k: v.bfloat16().float() for k, v in tower.state_dict().items()})
    with torch.no_grad():  # the time features' contribution alone (the code embedding is the same either way)
        ref = ref_tower.embed_events(codes, times) - ref_tower.embed_events(codes)
        tower.bfloat16()
        got = (tower.embed_events(codes, times).float() - tower.embed_events(codes).float())
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.03, f"bf16 EHR embedding off by {rel:.3f} relative (time features corrupted)"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=8, modalities=MODS)


def _engine(cfg_dict):
    from medfm.pretrain.engine import Engine, init_distributed, setup_environment

    setup_environment()
    rank, world = init_distributed()
    return Engine(from_dict(RunConfig, cfg_dict), rank, world)


def test_ddp_bf16_keeps_ehr_times_and_fp32_master_weights(shards, tmp_path, monkeypatch):
    from medfm.model_zoo.ehr import EHRTransformer
    from medfm.pretrain.train import _micro_step, build_data

    seen = []
    orig = EHRTransformer.embed_events

    def spy(self, codes, times=None, *args, **kwargs):
        seen.append(times.detach().clone())
        return orig(self, codes, times, *args, **kwargs)

    monkeypatch.setattr(EHRTransformer, "embed_events", spy)
    cfg = run_config(tmp_path / "run", shards, OBJ, MODS, batch=4, steps=2,
                     train={"precision": "bf16", "strategy": "ddp"})
    engine = _engine(cfg)
    batch = next(iter(build_data(engine.cfg, engine, 0, 1)))
    batch["ehr_times"] = batch["ehr_times"] - 1000.3
    want = batch["ehr_times"].clone()
    _micro_step(engine, batch, batch["plan"], False)
    engine.step()
    assert seen and float((seen[0].float() - want).abs().max()) < 1e-3, "EHR times reached the tower rounded"
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert params and all(p.dtype == torch.float32 for p in params), {p.dtype for p in params}
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert all(torch.isfinite(p).all() for p in params)


def _losses(result) -> list[float]:
    return [row["contrastive:signal-ehr"] + 0.5 * row["mae:signal"] for row in result.losses]


@pytest.mark.slow
def test_ddp_bf16_and_zero3_bf16_train_alike(shards, tmp_path):
    """Same seed, same data, 20 steps: DDP's autocast and ZeRO-3's bf16 follow one loss curve (bf16 tolerance)."""
    from medfm.pretrain.train import run

    curves = {}
    for strategy in ("ddp", "zero3"):
        cfg = run_config(tmp_path / strategy, shards, OBJ, MODS, batch=4, steps=20,
                         train={"precision": "bf16", "strategy": strategy}, optim={"lr": 3e-4})
        curves[strategy] = _losses(run(from_dict(RunConfig, cfg)))
    ddp, z3 = curves["ddp"], curves["zero3"]
    assert len(ddp) == len(z3) == 20 and all(math.isfinite(v) for v in ddp + z3)
    rel = [abs(a - b) / abs(b) for a, b in zip(ddp, z3)]
    assert max(rel) < 0.05, f"DDP-bf16 vs ZeRO-3-bf16 loss curves differ: {[round(r, 4) for r in rel]}"
    assert ddp[-1] < ddp[0] and z3[-1] < z3[0]  # both learn
