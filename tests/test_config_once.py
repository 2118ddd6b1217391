"""One parse, one write (issue #16): the walk from a YAML value to the optimizer.

``medfm launch`` resolves the recipe once and writes ``runs/<name>/config.yaml`` once; each worker loads that file
once and calls pretrain's training entry with it. Old defect: the recipe was resolved by the launcher, the worker
resolved config.yaml again, then re-entered the ``medfm`` CLI whose ``pretrain`` parsed it a third time, and
pretrain rewrote config.yaml after the launcher had written it (3 parses of run configs, 2 writes).

Here the torchrun agent is replaced by the worker itself, in this process (a world of one), so every parse and
write of the real launch path is seen: ``yaml.safe_load`` calls are matched to the text parsed, ``os.replace``
calls to their destination."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.launch.cli import main  # noqa: E402


def test_launch_parses_the_recipe_once_and_writes_config_once(tmp_path, monkeypatch):
    from medfm.launch import launcher, worker
    from medfm.pretrain import collectives

    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(tmp_path / "run", shards, [{"name": "mae:image"}], ("image",), batch=2, steps=2,
                     train={"strategy": "ddp"}, optim={"lr": 0.0123, "min_lr_ratio": 1.0, "warmup_steps": 0})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)

    parsed, written = [], []
    real_load, real_replace = yaml.safe_load, os.replace
    monkeypatch.setattr(yaml, "safe_load", lambda text: parsed.append(text) or real_load(text))
    monkeypatch.setattr(os, "replace", lambda a, b: written.append(Path(b).name) or real_replace(a, b))
    # the torchrun agent, in-process: this node's one worker runs the command the launcher built
    monkeypatch.setattr(launcher, "run_agent", lambda argv, env: worker.main([argv[-1]]))
    monkeypatch.setattr(collectives, "shutdown", lambda: None)  # keep the world other in-process tests share

    assert main(["launch", str(recipe), "train.steps=3", "--nproc-per-node", "1"]) == 0

    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert parsed.count(recipe.read_text()) == 1  # the launcher resolved the recipe (+ overrides) once
    assert parsed.count(resolved) == 1  # the worker loaded the written file once (no re-resolve, no CLI re-entry)
    assert written.count("config.yaml") == 1  # one write: the launcher's (pretrain found the same text)
    assert yaml.safe_load(resolved)["train"]["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["lr"] == pytest.approx(0.0123, rel=1e-12) for r in rows)  # the YAML value reached the optimizer


def test_derived_batch_values_have_one_owner(tmp_path):
    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.ds_config import deepspeed_config
    from medfm.schema import ConfigError, from_dict

    base = run_config(tmp_path / "r", str(tmp_path), [{"name": "mae:image"}], ("image",), batch=3,
                      train={"grad_accum": 2})
    cfg = from_dict(RunConfig, {**base, "run_dir": ""})
    assert cfg.run_dir == "runs/test" and cfg.micro_batch == 3 and cfg.global_batch(4) == 24
    assert cfg.train.micro_batch == 0  # nothing mirrors data.batch_size into the config any more
    ds = deepspeed_config(cfg, 4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    cfg.train.global_batch = 12
    cfg.check_world([2])
    with pytest.raises(ConfigError, match=r"elastic --nnodes gives world sizes 2..4"):
        cfg.check_world([2, 4])
    with pytest.raises(ConfigError, match=r"global_batch=12 != micro_batch\(3\) x grad_accum\(2\) x world_size\(4\) = 24"):
        cfg.check_world(4)


def test_grad_accum_derived_from_global_and_micro_batch(tmp_path, capsys):
    """``train.grad_accum=0``: global_batch / (data.batch_size x world), computed by RunConfig and written into the
    resolved config (old code refused grad_accum=0)."""
    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.ds_config import deepspeed_config
    from medfm.schema import ConfigError, from_dict

    base = run_config(tmp_path / "r", str(tmp_path), [{"name": "mae:image"}], ("image",), batch=3,
                      train={"grad_accum": 0, "global_batch": 12})
    cfg = from_dict(RunConfig, base)
    assert cfg.grad_accum(2) == 2 and cfg.global_batch(2) == 12
    with pytest.raises(ConfigError, match=r"global_batch=12 is not a multiple of micro_batch\(3\) x world_size\(3\)"):
        cfg.check_world(3)
    cfg.resolve_world([2])
    assert cfg.train.grad_accum == 2 and deepspeed_config(cfg, 2)["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match=r"train.grad_accum=0 \(derived\) needs train.global_batch"):
        from_dict(RunConfig, run_config(tmp_path / "r", str(tmp_path), [{"name": "mae:image"}], ("image",),
                                        train={"grad_accum": 0}))

    make_shards(tmp_path / "shards", n=8, modalities=("image",))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(run_config(tmp_path / "run", str(tmp_path / "shards"), [{"name": "mae:image"}],
                                                ("image",), batch=3, train={"grad_accum": 0, "global_batch": 12})))
    assert main(["launch", str(recipe), "--nproc-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"gradient_accumulation_steps": 2' in out and "grad_accum: 2" in out


def test_derived_grad_accum_survives_a_zero3_resume_at_another_world_size(tmp_path):
    """``grad_accum: 0`` + a fixed ``train.global_batch``: a ZeRO-3 resume at another world size changes the per-rank
    batch (``keep_global_batch``) before the launcher fixes the derived accumulation in config.yaml. Old order: the
    launcher derived accumulation from the old batch (32 / (4 x 4) = 2), the worker then halved the batch, and its
    world check refused 2 x 2 x 4 = 16 != 32 on every restart."""
    from medfm.launch.launcher import prepare
    from medfm.launch.world import World
    from medfm.model_zoo import checkpoint_io as layout
    from medfm.pretrain.config import load_run_config, write_run_config
    from medfm.pretrain.reshard import keep_global_batch

    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, shards, [{"name": "mae:image"}], ("image",), batch=4, steps=4,
                     train={"strategy": "zero3", "grad_accum": 0, "global_batch": 32},
                     checkpoint={"resume": "latest"})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    # the checkpoint a world of 2 wrote: batch 4 per rank, accumulation 4 (global batch 32); the loader's global
    # batch per micro-step is 4 x 2 = 8
    root = run_dir / "checkpoints"
    client = layout.client_file(root, "step2")
    client.parent.mkdir(parents=True)
    client.write_text(json.dumps({"step": 2, "loader": {"global_batch": 8}}))
    layout.mark_complete(root, "step2", world_size=2, step=2)

    launched = prepare(recipe, [], World(nproc_per_node=4))
    assert (launched.data.batch_size, launched.train.grad_accum) == (2, 4)
    write_run_config(launched)
    worker = load_run_config(launched.config_file)  # what every rank of the new world starts from
    keep_global_batch(worker, 4)
    worker.resolve_world(4)
    assert worker.global_batch(4) == 32 and worker.train.grad_accum == 4
