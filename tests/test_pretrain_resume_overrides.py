"""Overrides on resume (issue #17): the lr, schedule, step count and cadences may change and do take effect (logged
as changed, recorded in config.yaml); the model, objectives, seeds, data and global batch may not (one line naming
the key, nothing rewritten). Old defect: ``optim.lr=1e30`` on resume trained at the checkpoint's lr while
config.yaml said 1e30."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig, lr_factor  # noqa: E402
from medfm.schema import ConfigError, from_dict  # noqa: E402


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overrides")
    shards = make_shards(tmp / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(tmp / "run", shards, [{"name": "mae:image"}], ("image", "text"), batch=4, steps=2,
                     train={"strategy": "ddp"}, checkpoint={"every": 2, "keep": 5, "final": True},
                     optim={"warmup_steps": 2, "min_lr_ratio": 0.1})
    from medfm.pretrain.train import run

    run(from_dict(RunConfig, cfg))
    return cfg


def _resume(cfg, **changes):
    from medfm.pretrain.train import run

    out = json.loads(json.dumps(cfg))
    out["checkpoint"]["resume"] = "step2"
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        d = out
        for p in path:
            d = d[p]
        d[last] = value
    return run(from_dict(RunConfig, out)), out


def test_allowed_overrides_take_effect_and_are_logged(first, capsys):
    res, cfg = _resume(first, optim__lr=0.05, train__steps=4)
    assert res.status == "finished"
    run_dir = Path(cfg["run_dir"])
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    # the logged lr is the one after step 3 (the schedule at index 3), from the new base lr and step count
    assert rows[3]["lr"] == pytest.approx(0.05 * lr_factor(3, 2, 4, 0.1), rel=1e-12)
    err = capsys.readouterr().err
    assert "resume: changed optim.lr 0.003 -> 0.05, train.steps 2 -> 4" in err
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["optim"]["lr"] == 0.05 and resolved["train"]["steps"] == 4


@pytest.mark.parametrize("key, value, named", [
    ("model__embed_dim", 32, "model.embed_dim"),
    ("train__seed", 7, "train.seed"),
    ("data__seed", 3, "data.seed"),
    ("objectives", [{"name": "mae:image"}, {"name": "contrastive:image-text"}], "objectives"),
    ("data__batch_size", 2, "global batch"),
])
def test_forbidden_overrides_are_refused_naming_the_key(first, key, value, named):
    run_dir = Path(first["run_dir"])
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"checkpoint.resume: .*{named}") as exc:
        _resume(first, **{key: value})
    assert "\n" not in str(exc.value)
    assert (run_dir / "config.yaml").read_text() == before  # nothing rewritten
