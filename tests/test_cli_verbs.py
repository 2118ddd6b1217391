"""The `medfm` command's verbs grouped by part: `medfm pretrain consolidate`, `medfm zoo release`; the old spellings
(`pretrain-consolidate`, `release`) still work; `medfm --help` lists the verbs under their part; a broken part's
import is an error, not a silently missing verb."""

import sys

import pytest

from medfm.launch import cli
from medfm.launch.cli import build_parser, main, parse


def _parse(argv):
    return parse(build_parser(), argv)


def test_pretrain_consolidate_new_and_old_spelling_reach_one_command(capsys):
    new = _parse(["pretrain", "consolidate", "runs/x", "--out", "m.safetensors", "--tag", "step3"])
    old = _parse(["pretrain-consolidate", "runs/x", "--out", "m.safetensors", "--tag", "step3"])
    assert new.func is old.func
    assert (new.path, new.out, new.tag) == (old.path, old.out, old.tag) == ("runs/x", "m.safetensors", "step3")


def test_pretrain_config_still_takes_a_config_path():
    args = _parse(["pretrain", "configs/tiny_cpu.yaml", "train.steps=2"])
    assert args.config == "configs/tiny_cpu.yaml" and args.overrides == ["train.steps=2"]
    assert args.func is not _parse(["pretrain", "consolidate", "d", "--out", "o"]).func
    # a config file that happens to be called `consolidate` is reached as a path
    assert _parse(["pretrain", "./consolidate"]).config == "./consolidate"


def test_zoo_release_and_release_are_one_command():
    argv = ["ckpt", "--name", "toy", "--version", "1.0", "--zoo", "z", "--eval", "r.json", "--force"]
    new, old = _parse(["zoo", "release", *argv]), _parse(["release", *argv])
    assert new.func is old.func
    for a in (new, old):
        assert (a.checkpoint, a.name, a.version, a.zoo, a.eval_report, a.force) == ("ckpt", "toy", "1.0", "z",
                                                                                   "r.json", True)


def test_old_spellings_run_and_say_so_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["pretrain-consolidate", missing, "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "medfm: 'pretrain-consolidate' is deprecated; use 'medfm pretrain consolidate'"
    assert err[1] == f"medfm: error: {missing}: not a run or checkpoint directory"
    assert main(["pretrain", "consolidate", missing, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"medfm: error: {missing}: not a run or checkpoint directory"]
    # `medfm release` is DESIGN.md's contract: it runs without a note
    assert main(["release", missing, "--name", "x", "--version", "1", "--zoo", str(tmp_path / "zoo")]) == 2
    assert "deprecated" not in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_help_lists_verbs_grouped_by_part(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("commands, by part (`medfm COMMAND --help` for each):")
    parts = [ln.strip() for ln in lines[start + 1:] if ln.startswith("  ") and not ln.startswith("    ")]
    assert parts[:6] == ["shards", "pretrain", "launch", "evals", "model_zoo", "demo"]

    def verbs_of(part):
        i = lines.index(f"  {part}")
        block = []
        for ln in lines[i + 1:]:
            if not ln.startswith("    "):
                break
            block.append(ln[4:].split("  ")[0])
        return block

    assert any(v.startswith("pretrain consolidate") for v in verbs_of("pretrain"))
    assert any(v.startswith("zoo ") and "release" in v.split()[1].split("|") for v in verbs_of("model_zoo"))
    assert any(v.startswith("shards build|") for v in verbs_of("shards"))
    # the old spellings are not listed as verbs of their own, only named as old spellings
    flat = [v for p in parts[:6] for v in verbs_of(p)]
    assert not any(v.startswith(("pretrain-consolidate", "release")) for v in flat)
    assert "medfm pretrain-consolidate (= medfm pretrain consolidate" in out


def test_a_broken_part_is_an_error_not_a_missing_verb(monkeypatch):
    """launch/cli.py used to skip a part whose cli module raised ModuleNotFoundError for itself ("does not exist
    yet"), so a deleted or misnamed module silently removed its verbs."""
    ghost = ("ghost", "medfm.ghost_part_cli") if isinstance(cli.PARTS[0], tuple) else "medfm.ghost_part_cli"
    monkeypatch.setattr(cli, "PARTS", (*cli.PARTS, ghost))
    monkeypatch.delitem(sys.modules, "medfm.ghost_part_cli", raising=False)
    with pytest.raises(ModuleNotFoundError, match="medfm.ghost_part_cli"):
        build_parser()
