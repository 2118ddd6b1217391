"""Collate sizes vs tower sizes (issue #16): one direction, checked. The towers state their input
(``img_size``, ``in_chans``, ``n_leads``, ``max_position_embeddings``); an unset collate field follows the tower
(medfm.model_zoo.input_sizes), a stated one must agree. Old defect: ``data.collate.image_size`` and the tower's
``img_size`` were stated independently, evaluation derived the collate from the tower while the sweep's FLOPs and
the memory estimate read the collate first, and nothing cross-checked them (a mismatched recipe trained at one size
and was evaluated at another)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import ConfigError, from_dict  # noqa: E402


def _base(tmp_path, **collate):
    cfg = run_config(tmp_path / "run", str(tmp_path / "shards"), [{"name": "mae:image"}, {"name": "mae:signal"},
                                                                  {"name": "contrastive:image-text"}],
                     ("image", "signal", "text"))
    cfg["data"]["collate"].update(collate)
    return cfg


@pytest.mark.parametrize("collate, named", [
    ({"image_size": [32, 32]}, "data.collate.image_size=[32, 32] disagrees with model.towers.image img_size=16"),
    ({"image_channels": 3}, "data.collate.image_channels=3 disagrees with model.towers.image in_chans=1"),
    ({"signal_leads": 12}, "data.collate.signal_leads=12 disagrees with model.towers.signal n_leads=2"),
    ({"text_max_tokens": 100}, "data.collate.text_max_tokens=100 exceeds model.towers.text max_position_embeddings=64"),
])
def test_collate_stated_against_its_tower_is_one_line(tmp_path, collate, named):
    with pytest.raises(ConfigError) as exc:
        from_dict(RunConfig, _base(tmp_path, **collate))
    assert named in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_launch_refuses_a_mismatch_before_anything_starts(tmp_path, capsys):
    from medfm.launch.cli import main

    make_shards(tmp_path / "shards", n=4, modalities=("image", "signal", "text"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_base(tmp_path)))
    assert main(["launch", str(recipe), "model.towers.image.overrides.img_size=32", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.collate.image_size=[16, 16]" in err[0] and "img_size=32" in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written


def test_unset_collate_follows_the_tower_everywhere(tmp_path):
    """Evaluation's batches, the a-priori FLOPs (the sweep's x-axis) and the memory estimate see one input size."""
    from medfm.evals.features import _collate_config
    from medfm.launch.memory import activation_stacks
    from medfm.model_zoo import build_multimodal
    from medfm.pretrain.step_flops import planned_sample_flops

    stated = from_dict(RunConfig, _base(tmp_path))
    unset = from_dict(RunConfig, _base(tmp_path, image_size=None, image_channels=None, signal_leads=None))
    assert planned_sample_flops(unset) == planned_sample_flops(stated)
    assert [(s.name, s.tokens) for s in activation_stacks(unset)] == [(s.name, s.tokens)
                                                                      for s in activation_stacks(stated)]
    model = build_multimodal(unset.model)
    col = _collate_config(model, "image", None)
    assert (col.image_size, col.image_channels) == (stated.data.collate.image_size, stated.data.collate.image_channels)
    assert _collate_config(model, "signal", None).signal_leads == stated.data.collate.signal_leads
