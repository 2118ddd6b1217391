"""The demo as its own part (issue #16): medfm.demo is imported only by the ``medfm`` CLI assembly (and tests), the
MNI152 template that demo data is cut from is read in one module, and the demo's configs come from the YAML recipes
(configs/pretrain/demo.yaml, configs/ingest/demo.yaml) through ``medfm.configs`` instead of Python dicts."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("schema", "shards", "model_zoo", "pretrain", "launch", "evals", "configs", "medfm_pkg")


def _py_files(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_cli_assembly_names_medfm_demo():
    """Dependencies point demo -> {launch, pretrain, evals, shards, model_zoo}: no library module imports medfm.demo;
    launch/cli.py names the demo's verb module (a string, imported with the other parts' verbs)."""
    importers = [str(p.relative_to(ROOT)) for p in _py_files(*LIBRARY)
                 if any(m == "medfm.demo" or m.startswith("medfm.demo.") for m in _imported_modules(p))]
    assert importers == []
    from medfm.launch import cli

    assert ("demo", "medfm.demo.cli") in cli.PARTS
    assert not (ROOT / "launch" / "demo.py").exists() and not (ROOT / "launch" / "demo_corpus.py").exists()


def _reads_mni_template(path: Path) -> bool:
    """True when the file calls ``require("nifti_mni152")`` (the template every MNI patch / block is cut from)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "require"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "nifti_mni152"):
            return True
    return False


def test_the_mni_template_is_read_in_one_place():
    """MNI patches were cut in launch/demo_corpus.py and again in tests/evals_realtasks.py, each reading the template
    itself; now every MNI dataset (corpus families and the eval tests' tasks) comes from medfm.demo.mni."""
    readers = [str(p.relative_to(ROOT)) for p in _py_files(*LIBRARY, "demo", "tests", "benchmarks")
               if _reads_mni_template(p)]
    # test_demo_corpus.py reads the template as the independent reference a corpus block is compared with (it
    # writes nothing); the corpus and every test task are cut by medfm.demo.mni.
    assert readers == ["demo/mni.py", "tests/test_demo_corpus.py"]


def test_demo_pretrain_config_is_the_yaml_recipe_plus_run_overrides(tmp_path):
    from medfm.configs import ROOT as RECIPES
    from medfm.demo.recipes import PRETRAIN_RECIPE, pretrain_config
    from medfm.schema import load_yaml

    corpus = {"datasets": {d: str(tmp_path / "shards" / d) for d in ("real", "mri2d", "mri3d", "ecg", "ehr")}}
    cfg = pretrain_config(corpus, tmp_path / "run", steps=90)
    recipe = load_yaml(RECIPES / PRETRAIN_RECIPE)
    assert cfg["run_dir"] == str(tmp_path / "run") and cfg["train"]["steps"] == 90
    assert cfg["checkpoint"]["every"] == 30  # max(10, steps // 3)
    assert [(s["name"], s["path"]) for s in cfg["data"]["sources"]] == [
        (s["name"], str((tmp_path / "shards" / s["name"]).resolve())) for s in recipe["data"]["sources"]]
    # everything else is the recipe as written
    for key in ("run_dir", "data", "train", "checkpoint"):
        cfg.pop(key), recipe.pop(key)
    assert cfg == recipe


def test_demo_pretrain_config_follows_the_recipe_file(tmp_path, monkeypatch):
    """The recipe is read, not restated: an edit to the YAML reaches the demo's run config."""
    from medfm.configs import ROOT as RECIPES
    from medfm.demo import recipes

    data = yaml.safe_load((RECIPES / recipes.PRETRAIN_RECIPE).read_text())
    data["optim"]["lr"] = 1.234e-3
    (tmp_path / "pretrain").mkdir()
    (tmp_path / recipes.PRETRAIN_RECIPE).write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setattr(recipes, "RECIPES", tmp_path)
    corpus = {"datasets": {d: str(tmp_path / d) for d in ("mri2d", "mri3d", "ecg")}}
    assert recipes.pretrain_config(corpus, tmp_path / "run", steps=5)["optim"]["lr"] == 1.234e-3


def test_real_family_ingest_settings_follow_configs_ingest_demo_yaml(tmp_path, monkeypatch):
    """The `real` dataset's ingest settings were a Python copy of configs/ingest/demo.yaml ("change both
    together"); now they are that file."""
    from medfm.configs import ROOT as RECIPES
    from medfm.demo import corpus

    data = yaml.safe_load((RECIPES / corpus.REAL_RECIPE).read_text())
    data["preprocess"]["image"]["max_size"] = 128
    (tmp_path / "ingest").mkdir()
    (tmp_path / corpus.REAL_RECIPE).write_text(yaml.safe_dump(data))
    monkeypatch.setattr(corpus, "RECIPES", tmp_path)
    corpus._family_configs_json.cache_clear()
    try:
        assert corpus.ingest_config("real", "a-salt-of-16-chars", 1).preprocess.image.max_size == 128
        assert corpus.ingest_config("mri2d", "a-salt-of-16-chars", 1).preprocess.image.max_size is None
    finally:
        corpus._family_configs_json.cache_clear()


def test_medfm_demo_verb_loads_the_demo_only_when_run():
    code = ("import sys; from medfm.launch.cli import build_parser; p = build_parser(); "
            "p.parse_args(['demo', '--steps', '3']); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('medfm.demo'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["medfm.demo", "medfm.demo.cli"]
