"""Issue #16, "no behaviour change": the trainer (pretrain/train.py, split into train_step / log_step /
maybe_checkpoint and a metrics object) trains exactly what a plain loop written from its contract trains — the
same per-step losses and the same final weights, bit for bit, on the same seed. The plain loop below is the
contract and nothing more: one Engine, the real loader, ``grad_accum`` micro-batches per step (forward, backward,
step), each DataLoader iterator started inside ``fork_rng`` (the loop's documented RNG rule), losses averaged over
the micro-batches. It passes on the pre-#16 loop (commit 4d7bcc8) too, so the refactor changed neither.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import from_dict  # noqa: E402

CAPTURED: dict[str, dict[str, torch.Tensor]] = {}


def capture_weights(model, step, run_dir):
    """eval.hook: the model's full weights at the last step (gathered under ZeRO-3)."""
    import contextlib

    params = list(model.parameters())
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    with ctx:
        CAPTURED[str(run_dir)] = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
                                  if v.is_floating_point()}


def plain_loop(cfg: RunConfig) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from medfm.pretrain.engine import Engine, init_distributed, setup_environment
    from medfm.shards.loader import build_loader

    setup_environment()
    init_distributed()
    engine = Engine(cfg, 0, 1)
    tokenizer = None
    if "text" in engine.module.model.towers:
        from medfm.model_zoo.tokenizers import build_tokenizer, tokenizer_spec

        tower = engine.module.model.towers["text"]
        tokenizer = build_tokenizer(tokenizer_spec(tower, cfg.train.tokenizer, cfg.data.collate.text_max_tokens))
    loader = build_loader(cfg.data, rank=0, world_size=1, tokenizer=tokenizer)
    it, losses = None, []
    for step in range(cfg.train.steps):
        sums: dict[str, float] = {}
        for _ in range(cfg.train.grad_accum):
            batch = next(it, None) if it is not None else None
            if batch is None:
                with torch.random.fork_rng(devices=[]):
                    it = iter(loader)
                    batch = next(it)
            out, total, _ = engine.forward(batch, batch.get("plan"))
            engine.backward(total)
            engine.step(False)
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach().float()) / cfg.train.grad_accum
        losses.append({"step": step + 1, **sums})
    return losses, engine.gathered_state_dict()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("parity"), n=8, modalities=("image", "text"))


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_trainer_matches_the_plain_loop_bit_for_bit(tmp_path, shards, strategy):
    from medfm.pretrain.train import run

    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text", "weight": 0.5}]
    cfg = run_config(tmp_path / "run", shards, objectives, ("image", "text"), batch=4, steps=3,
                     train={"strategy": strategy, "grad_accum": 2, "log_every": 2},
                     eval={"every": 3, "hook": f"{__name__}:capture_weights"},
                     optim={"warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 1.0})
    trainer = run(from_dict(RunConfig, copy.deepcopy(cfg)))
    assert trainer.status == "finished" and trainer.skipped == 0
    cfg["run_dir"] = str(tmp_path / "plain")
    losses, weights = plain_loop(from_dict(RunConfig, cfg))
    assert trainer.losses == losses  # exact floats, every step and objective
    trained = CAPTURED.pop(str(tmp_path / "run"))
    reference = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    assert sorted(trained) == sorted(reference)
    changed = [k for k in trained if not torch.equal(trained[k], reference[k])]
    assert not changed, changed[:5]


def test_no_function_in_pretrain_is_longer_than_a_screen():
    """Issue #16: the loop was one 153-line ``run``; every function in pretrain/ now fits on a screen (<= 60 lines)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "pretrain"
    long = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
