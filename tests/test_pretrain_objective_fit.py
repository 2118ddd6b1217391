"""Objectives vs the model: one check (``pretrain.objectives.check_objectives_fit``), run where the config is
validated, instead of three (RunConfig.validate, the engine after building, the launch preflight on meta)."""

import re
from pathlib import Path

import pytest

from medfm.model_zoo import MultiModalConfig
from medfm.pretrain.objectives import ObjectiveConfig, check_objectives_fit
from medfm.schema import from_dict

REPO = Path(__file__).resolve().parents[1]


def _model(**extra):
    return from_dict(MultiModalConfig, {"towers": {"image": {"arch": "vit2d_tiny_p16"},
                                                   "signal": {"arch": "signal_tiny"}}, **extra})


@pytest.mark.parametrize("name, expected", [
    ("contrastive:image-text", "objectives[0] 'contrastive:image-text' needs model.towers.text (have ['image', "
                               "'signal'])"),
    ("mae:signal", "objectives[0] 'mae:signal' needs 'signal' in model.mae"),
    ("caption:image", "needs model.towers.text"),
])
def test_misfits_are_one_line_naming_the_field(name, expected):
    with pytest.raises(ValueError) as err:
        check_objectives_fit([ObjectiveConfig(name)], _model(mae=["image"]))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_caption_needs_the_decoder_and_a_fit_passes():
    model = _model(mae=["image"])
    model.towers["text"] = from_dict(MultiModalConfig, {"towers": {"text": {"arch": "text_bert_tiny"}}}).towers["text"]
    with pytest.raises(ValueError, match=r"objectives\[1\] 'caption:image' needs model.caption.enabled=true"):
        check_objectives_fit([ObjectiveConfig("mae:image"), ObjectiveConfig("caption:image")], model)
    check_objectives_fit([ObjectiveConfig("mae:image"), ObjectiveConfig("contrastive:image-signal"),
                          ObjectiveConfig("contrastive:image-text")], model)


def test_one_definition_of_the_fit_check():
    """The engine and the preflight build from a validated config; neither re-checks objectives against the model
    (the old model-level copy, ``check_objectives_fit_model``, said the same things in other words)."""
    callers = sorted(f.relative_to(REPO).as_posix() for part in ("pretrain", "launch", "evals")
                     for f in (REPO / part).rglob("*.py") if re.search(r"check_objectives_fit\w*\(", f.read_text()))
    assert callers == ["pretrain/config.py", "pretrain/objectives.py"]
