"""The dry run's per-device memory estimate with activations (launch/memory.py): the per-block count reproduces
Korthikanti et al. 2022's sbh(34 + 5as/h) in its own setting, activations scale linearly with micro-batch and
depth, the breakdown sums to the total the dry run prints, and preflight checks that total (not the model states
alone) against zero.device_memory_gib."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.launch.cli import main  # noqa: E402
from medfm.launch.memory import (  # noqa: E402
    ModelSize,
    Stack,
    activation_stacks,
    block_activation_bytes,
    estimate_memory,
    format_breakdown,
)
from medfm.pretrain.config import load_run_config  # noqa: E402

LARGE = str(Path(__file__).resolve().parents[1] / "configs" / "image_large.yaml")
SIZE = ModelSize(352_525_571, 11_720_448, "text.word_embeddings", "meta")  # what count_model gives for LARGE


def test_block_count_is_korthikanti_in_its_setting():
    # 16-bit, MLP 4h, dropout everywhere, no fused attention: sbh(34 + 5as/h) bytes per layer (eq. 2)
    s, b, h, a = 2048, 4, 1024, 16
    got = block_activation_bytes(s, h, a, 4 * h, b, 2, hidden_dropout=True, attn_dropout=True)
    assert got == s * b * h * 34 + 5 * a * s * s * b
    # fused attention, no dropout: no masks (-2sbh), no s^2 term; the kernel's output (+2sbh) + fp32 logsumexp
    fused = block_activation_bytes(s, h, a, 4 * h, b, 2)
    assert fused == s * b * h * 34 + 4 * a * s * b


def test_activations_linear_in_micro_batch_and_depth():
    base = load_run_config(LARGE, ["data.batch_size=2"])
    double = load_run_config(LARGE, ["data.batch_size=4"])
    a2 = estimate_memory(base, SIZE, 2, 1, "cpu").activations
    a4 = estimate_memory(double, SIZE, 2, 1, "cpu").activations
    assert a2.keys() == a4.keys() == {"image", "image MAE encoder", "image MAE decoder", "text"}
    assert all(a4[k] == 2 * a2[k] for k in a2)
    deep = load_run_config(LARGE, ["data.batch_size=2", "model.towers.image.overrides.depth=48"])
    ad = estimate_memory(deep, SIZE, 2, 1, "cpu").activations
    assert ad["image"] == 2 * a2["image"] and ad["image MAE encoder"] == 2 * a2["image MAE encoder"]
    assert ad["text"] == a2["text"] and ad["image MAE decoder"] == a2["image MAE decoder"]
    stack = Stack("x", 197, 1024, 24, 16, 4096)
    assert stack.bytes(3, 2) == 3 * stack.bytes(1, 2)


def test_tokens_follow_collate_and_masking():
    cfg = load_run_config(LARGE, ["data.batch_size=2"])
    stacks = {s.name: s for s in activation_stacks(cfg)}
    assert stacks["image"].tokens == 14 * 14 + 1  # 224/16 patches + class token
    assert stacks["image MAE encoder"].tokens == 1 + 49  # 25 % of the patches kept
    assert stacks["text"].tokens == 128 and stacks["text"].width == 384 and stacks["text"].depth == 6
    assert stacks["text"].attn_dropout  # MiniLM's config.json: attention dropout 0.1 -> math path
    ckpt = load_run_config(LARGE, ["data.batch_size=2", "train.grad_checkpointing=[image]"])
    assert {s.name: s for s in activation_stacks(ckpt)}["image"].bytes(2, 2) < stacks["image"].bytes(2, 2) / 4


def test_breakdown_sums_to_total_and_prints_it():
    cfg = load_run_config(LARGE, ["data.batch_size=2"])
    for device in ("cpu", "cuda"):
        mem = estimate_memory(cfg, SIZE, 2, 1, device)
        parts = mem.model_states + sum(mem.activations.values()) + sum(mem.zero3.values()) + mem.baseline
        assert mem.total == parts and min(mem.activations.values()) > 0 and mem.baseline > 0
        text = format_breakdown(mem, cfg)
        for label in ("model states", "activations", "ZeRO-3 buffers", "baseline", "total"):
            assert re.search(rf"^  {label} ", text, re.M), label
        total = re.search(r"total\s+([\d.]+) GiB", text).group(1)
        assert float(total) == pytest.approx(mem.total / 2**30, abs=0.006)
    cpu, cuda = (estimate_memory(cfg, SIZE, 2, 1, d) for d in ("cpu", "cuda"))
    assert cpu.model_states > cuda.model_states  # CPU: the host share is the same memory
    assert cuda.zero3["AdamW step temporary"] == 4 * ((SIZE.total_params + 1) // 2)  # one fp32 per partition element
    offloaded = estimate_memory(cfg, SIZE, 2, 1, "cuda", offload_optimizer=True)
    assert "AdamW step temporary" not in offloaded.zero3  # the step runs in host memory


@pytest.fixture
def tiny_config(tmp_path):
    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(tmp_path / "runs" / "x", shards, [{"name": "mae:image"}, {"name": "contrastive:image-text"}],
                     ("image", "text"), batch=2, steps=4)
    return cfg, tmp_path / "run.yaml"


def test_preflight_checks_the_total_not_only_model_states(tiny_config, capsys):
    cfg, path = tiny_config
    cfg.setdefault("zero", {})["device_memory_gib"] = 0.1  # tiny model states fit; the baseline alone does not
    path.write_text(yaml.safe_dump(cfg))
    assert main(["launch", str(path), "--nproc-per-node", "2", "--dry-run"]) == 2
    errs = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("medfm: error:")]
    assert len(errs) == 1 and "zero.device_memory_gib=0.1: the ZeRO-3 estimate needs" in errs[0], errs
    assert "baseline 0." in errs[0] and "activations" in errs[0]
    cfg["zero"]["device_memory_gib"] = 16.0
    path.write_text(yaml.safe_dump(cfg))
    assert main(["launch", str(path), "--nproc-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per-device estimate" in out and re.search(r"^  total ", out, re.M)
