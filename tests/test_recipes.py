"""Recipes as package data (medfm.configs): ``base:`` includes in the one YAML loader, recipe names that resolve
from the package in any directory, ``medfm recipes list|show``, and a wheel that carries every recipe."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from checkout_copy import fresh_copy  # noqa: E402

from medfm.configs import ROOT, registry  # noqa: E402
from medfm.launch.cli import main  # noqa: E402
from medfm.schema import ConfigError, from_dict, load_yaml, read_yaml_mapping  # noqa: E402


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# -- base: includes ------------------------------------------------------------------------------------------
def test_base_merges_deep_child_wins_lists_replaced_relative_to_the_including_file(tmp_path):
    _write(tmp_path / "common" / "optim.yaml", {"optim": {"lr": 1.0, "betas": [0.9, 0.95], "wd": 0.05}})
    _write(tmp_path / "common" / "train.yaml", {"base": "optim.yaml", "train": {"steps": 10, "tags": [1, 2]},
                                                "optim": {"wd": 0.1}})
    _write(tmp_path / "run.yaml", {"base": ["common/train.yaml"], "optim": {"lr": 2.0}, "train": {"tags": [3]}})
    got = read_yaml_mapping(tmp_path / "run.yaml")
    assert got == {"optim": {"lr": 2.0, "betas": [0.9, 0.95], "wd": 0.1}, "train": {"steps": 10, "tags": [3]}}


def test_later_bases_win_and_a_child_restating_every_key_sets_the_order(tmp_path):
    _write(tmp_path / "a.yaml", {"towers": {"image": {"w": 1}, "text": {"w": 1}}, "x": 1})
    _write(tmp_path / "b.yaml", {"x": 2})
    _write(tmp_path / "keep.yaml", {"base": ["a.yaml", "b.yaml"], "towers": {"text": {"w": 2}, "ehr": {"w": 3}}})
    _write(tmp_path / "order.yaml", {"base": "a.yaml", "towers": {"volume": {"w": 4}, "text": {}, "image": {}}})
    keep = read_yaml_mapping(tmp_path / "keep.yaml")
    assert keep["x"] == 2 and list(keep["towers"]) == ["image", "text", "ehr"] and keep["towers"]["text"] == {"w": 2}
    assert list(read_yaml_mapping(tmp_path / "order.yaml")["towers"]) == ["volume", "text", "image"]


@pytest.mark.parametrize("case, expect", [
    ("cycle", "base: include cycle a.yaml -> b.yaml -> a.yaml"),
    ("self", "base: include cycle self.yaml -> self.yaml"),
    ("missing", "base: nope.yaml not found"),
    ("badtype", "base: expected a file name or a list of them"),
])
def test_bad_bases_fail_in_one_line_naming_the_file(tmp_path, case, expect):
    _write(tmp_path / "a.yaml", {"base": "b.yaml", "x": 1})
    _write(tmp_path / "b.yaml", {"base": "a.yaml", "y": 1})
    _write(tmp_path / "self.yaml", {"base": "self.yaml"})
    _write(tmp_path / "missing.yaml", {"base": ["nope.yaml"]})
    _write(tmp_path / "badtype.yaml", {"base": {"file": "a.yaml"}})
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(tmp_path / f"{'a' if case == 'cycle' else case}.yaml")
    msg = str(err.value)
    assert expect in msg and "\n" not in msg and msg.startswith(str(tmp_path))


def test_launch_reports_a_base_cycle_in_one_line_exit_2(tmp_path, capsys):
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    assert main(["launch", str(tmp_path / "a.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "include cycle" in err[0]


def test_shared_blocks_are_written_once():
    """The optimizer line the cluster recipes shared (nine copies) lives in common/optim.yaml only; every run recipe
    still resolves to a full config."""
    line = "weight_decay: 0.05, betas: [0.9, 0.95], warmup_steps: 2000"
    holders = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml") if line in p.read_text()]
    assert holders == ["common/optim.yaml"]
    # the tiny towers tiny_cpu and pretrain/tiny_multimodal share (the demo's own recipe, pretrain/demo.yaml, sizes
    # its towers differently and states them itself)
    tiny = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml")
            if "vocab_size: 259" in p.read_text() and p.name != "demo.yaml"]
    assert tiny == ["common/tiny.yaml"]


def test_the_resolved_config_is_the_merged_one():
    from medfm.launch.resolve import resolve_config
    from medfm.schema import to_dict

    cfg = to_dict(resolve_config(ROOT / "image_large.yaml"))
    assert "base" not in cfg and cfg["optim"]["betas"] == [0.9, 0.95] and cfg["optim"]["lr"] == 1.0e-4
    assert cfg["model"]["towers"]["image"]["arch"] == "vit2d_large_p16" and cfg["train"]["precision"] == "bf16"
    assert cfg["data"]["sources"] == [{**cfg["data"]["sources"][0], "path": "data/shards/image"}]


def test_a_sweep_base_is_its_run_recipe_not_an_include():
    from medfm.launch.sweep import load_sweep

    sweep, base = load_sweep("sweep_tiny")  # by name: its base resolves next to the packaged file
    assert base == (ROOT / "tiny_cpu.yaml").resolve() and sweep.sizes
    assert registry.kind("sweep_tiny") == "sweep" and registry.kind("tiny_cpu") == "run"


# -- names ----------------------------------------------------------------------------------------------------
def test_a_recipe_name_works_where_a_path_does_from_any_directory(tmp_path, monkeypatch):
    from medfm.evals.suite import load_suite
    from medfm.pretrain.config import load_run_config
    from medfm.shards.ingest import IngestConfig

    monkeypatch.chdir(tmp_path)  # no configs/ here
    for spelling in ("tiny_cpu", "tiny_cpu.yaml", "configs/tiny_cpu.yaml"):
        assert load_run_config(spelling).name == "tiny-cpu"
    assert load_suite("evals/demo").base_dir == str(ROOT / "evals")  # data_root / prompts relative to the file
    assert load_yaml("ingest/demo", IngestConfig).max_samples == 64
    _write(tmp_path / "tiny_cpu.yaml", {"base": str(ROOT / "tiny_cpu.yaml"), "name": "mine"})
    assert load_run_config("tiny_cpu.yaml").name == "mine"  # an existing file wins over the recipe name
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config("no_such_recipe")
    with pytest.raises(ConfigError, match="config file not found"):  # ./ names a file: no silent shipped recipe
        load_run_config("./volume_base.yaml")


def test_every_shipped_recipe_reads_and_validates_against_its_schema():
    from medfm.evals.suite import EvalSuite
    from medfm.launch.resolve import resolve_config
    from medfm.launch.sweep import load_sweep
    from medfm.shards.ingest import IngestConfig
    from medfm.shards.loader import LoaderConfig

    typed = {"ingest": IngestConfig, "loader": LoaderConfig, "eval suite": EvalSuite}
    kinds = {}
    for name in registry.names():
        kind = kinds[name] = registry.kind(name)
        if kind == "run":
            resolve_config(name)
        elif kind == "sweep":
            load_sweep(name)
        elif kind in typed:
            from_dict(typed[kind], read_yaml_mapping(name))
    assert {"run", "sweep", "eval suite", "ingest", "loader", "prompts", "include"} == set(kinds.values())


def test_recipes_list_and_show(capsys):
    assert main(["recipes", "list"]) == 0
    rows = {ln.split()[0]: ln.split()[1] for ln in capsys.readouterr().out.splitlines()}
    assert rows["tiny_cpu"] == "run" and rows["pretrain/tiny_multimodal"] == "run" and rows["common/optim"] == "include"
    assert main(["recipes", "show", "signal_small"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in shown and shown["optim"]["lr"] == 3e-4 and shown["optim"]["warmup_steps"] == 2000
    assert shown["model"]["towers"]["signal"] == {"arch": "signal_small", "overrides": {"n_leads": 12, "max_len": 5000}}
    assert main(["recipes", "show", "tiny_cpux"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no recipe named 'tiny_cpux'" in err and "did you mean 'tiny_cpu'" in err and "\n" not in err


# -- packaging ------------------------------------------------------------------------------------------------
def test_a_plain_wheel_ships_every_recipe_and_they_resolve_without_a_checkout(tmp_path):
    src, wheels, site, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "elsewhere"))
    for d in (src, elsewhere):
        d.mkdir()
    fresh_copy(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(wheels)], cwd=src,
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("medfm-*.whl"))
    shipped = {n.removeprefix("medfm/configs/") for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("medfm/configs/") and n.endswith(".yaml")}
    assert shipped == {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml")}
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    probe = ("import sys, medfm.configs as c; from medfm.pretrain.config import load_run_config as f; "
             "assert c.ROOT.is_relative_to(sys.argv[1]), c.ROOT; "
             "print(f('configs/pretrain/tiny_multimodal.yaml').name, f('image_large').optim.lr)")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=elsewhere, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["tiny_multimodal", "0.0001"]
