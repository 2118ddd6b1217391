"""medfm.schema: strict typed configs, dotted overrides, one-line errors naming the key."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from medfm.schema import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Run:
    name: str = "x"
    steps: int = 10
    bf16: bool = False
    optim: Optim = field(default_factory=Optim)
    weights: dict[str, float] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    seed: Optional[int] = None

    def validate(self):
        if self.steps <= 0:
            raise ValueError("steps: expected a positive integer")


def test_round_trip_and_coercion():
    cfg = from_dict(Run, {"steps": "20", "bf16": "true", "optim": {"lr": "3e-4", "betas": [0.9, 0.99]},
                          "weights": {"mae": 1}, "paths": ["a", "b"]})
    assert cfg.steps == 20 and cfg.bf16 is True and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.weights == {"mae": 1.0}
    assert from_dict(Run, to_dict(cfg)) == cfg


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\)"):
        from_dict(Run, {"optim": {"lrr": 1}})


def test_wrong_type_and_choice_and_validate():
    with pytest.raises(ConfigError, match=r"^steps: expected an integer, got 'ten'$"):
        from_dict(Run, {"steps": "ten"})
    with pytest.raises(ConfigError, match=r"optim.schedule: expected one of"):
        from_dict(Run, {"optim": {"schedule": "cosin"}})
    with pytest.raises(ConfigError, match="steps: expected a positive integer"):
        from_dict(Run, {"steps": 0})


def test_dotted_overrides_checked_against_schema(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: demo\noptim:\n  lr: 0.1\n")
    cfg = load_yaml(p, Run, ["optim.lr=0.5", "paths=[x, y]", "weights.clip=0.5", "seed=3"])
    assert cfg.optim.lr == 0.5 and cfg.paths == ["x", "y"] and cfg.weights == {"clip": 0.5} and cfg.seed == 3
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.betaz' \(did you mean 'betas'\?\)"):
        apply_overrides({}, ["optim.betaz=1"], Run)
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["steps"], Run)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml", Run)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(bad, Run)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_yaml(lst, Run)


def test_cli_overrides_may_follow_flags(capsys):
    from medfm.launch.cli import build_parser, parse

    parser = build_parser()
    args = parse(parser, ["pretrain", "cfg.yaml", "a.b=1"])
    assert args.overrides == ["a.b=1"]
    args = parse(parser, ["eval", "ck", "--suite", "s.yaml", "n_boot=200", "seed=1"])
    assert args.overrides == ["n_boot=200", "seed=1"] and args.suite == "s.yaml"
    with pytest.raises(SystemExit) as exc:
        parse(parser, ["eval", "ck", "--suite", "s.yaml", "stray"])
    assert exc.value.code == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
