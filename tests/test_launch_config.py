"""``medfm launch`` before any process starts: config validation (exit 2, one line), the resolved run directory,
``--dry-run`` (world, DeepSpeed config, ZeRO-3 memory checked against DeepSpeed's estimator) and the torchrun
command + environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.launch.cli import main  # noqa: E402
from medfm.launch.world import World, torchrun_argv, worker_env  # noqa: E402
from medfm.schema import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("cfg_shards") / "shards", n=8, modalities=("image", "text"))


@pytest.fixture
def config(tmp_path, shards):
    cfg = run_config(tmp_path / "runs" / "x", shards, [{"name": "mae:image"}, {"name": "contrastive:image-text"}],
                     ("image", "text"), batch=2, steps=4)
    del cfg["run_dir"]  # launch derives runs/<name>
    cfg["name"] = "cfgtest"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("override, expect", [
    ("train.stepz=3", "unknown config key 'train.stepz' (did you mean 'steps'?)"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("train.global_batch=12", "train.global_batch=12 != micro_batch(2) x grad_accum(1) x world_size(2) = 4"),
    ("data.sources=[{path: /nonexistent/shards}]", "data.sources[0].path: no shard directory at /nonexistent/shards"),
])
def test_bad_config_is_one_line_exit_2(capsys, config, monkeypatch, tmp_path, override, expect):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "launch", str(config), override, "--nproc-per-node", "2", "--dry-run")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("medfm: error: ") and expect in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()  # nothing written


def test_unknown_key_in_file_names_closest(capsys, config, tmp_path):
    data = yaml.safe_load(config.read_text())
    data["trian"] = data.pop("train")
    config.write_text(yaml.safe_dump(data))
    rc, _, err = _run(capsys, "launch", str(config), "--dry-run")
    assert rc == 2 and "unknown config key 'trian' (did you mean 'train'?)" in err and err.count("\n") == 1


def test_bad_world_is_one_line_exit_2(capsys, config):
    rc, _, err = _run(capsys, "launch", str(config), "--nnodes", "2", "--dry-run")
    assert rc == 2 and "--rdzv-endpoint: required with more than one node" in err
    rc, _, err = _run(capsys, "launch", str(config), "--nnodes", "2", "--rdzv-endpoint", "nohost", "--dry-run")
    assert rc == 2 and "expected host:port" in err
    rc, _, err = _run(capsys, "launch", str(config), "train.global_batch=4", "--nnodes", "1:2",
                      "--rdzv-endpoint", "h:29500", "--dry-run")
    assert rc == 2 and "elastic --nnodes gives world sizes 1..2" in err


def test_dry_run_prints_everything_and_writes_nothing(capsys, config, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(capsys, "launch", str(config), "train.grad_accum=2", "--nproc-per-node", "2", "--dry-run")
    assert rc == 0
    sections = dict(part.split(" ==\n", 1) for part in out.strip().split("\n\n== ") if " ==\n" in part)
    resolved = yaml.safe_load(out.split("== resolved config ==\n", 1)[1].split("\n\n== ")[0])
    assert resolved["run_dir"] == "runs/cfgtest" and resolved["train"]["grad_accum"] == 2
    assert "world size 2" in sections["world"]
    ds = json.loads(sections["DeepSpeed config (world size 2)"])
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["zero_optimization"]["stage"] == 3
    assert "parameters" in sections["memory"] and "<- this config" in sections["memory"]
    assert "--rdzv-backend c10d" in sections["command"] and "--rdzv-id cfgtest" in sections["command"]
    assert "OMP_NUM_THREADS=" in sections["command"]
    assert not (tmp_path / "runs").exists()


def test_resolve_run_dir_follows_name_override(config, tmp_path, monkeypatch):
    from medfm.launch.resolve import resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config(config, ["name=other"]).run_dir == "runs/other"
    assert resolve_config(config, ["run_dir=/tmp/elsewhere"]).run_dir == "/tmp/elsewhere"


def test_torchrun_command_and_environment(tmp_path):
    world = World(nproc_per_node=4, nnodes="2", node_rank=1, rdzv_endpoint="head:29400", max_restarts=3)
    argv = torchrun_argv(world, tmp_path / "config.yaml", "my run/1", tmp_path / "logs")
    text = " ".join(argv)
    for part in ("-m torch.distributed.run", "--nnodes 2", "--nproc-per-node 4", "--rdzv-backend c10d",
                 "--rdzv-endpoint head:29400", "--rdzv-id my-run-1", "--max-restarts 3", "--node-rank 1",
                 f"--log-dir {tmp_path / 'logs'}", "-m medfm.launch.worker"):
        assert part in text, part
    assert argv[-1] == str(tmp_path / "config.yaml")
    env = worker_env(world, base={}, cpus=16, cuda=False)
    assert env["OMP_NUM_THREADS"] == "4" and env["DS_ACCELERATOR"] == "cpu"
    env = worker_env(world, base={"OMP_NUM_THREADS": "2"}, cpus=16, cuda=True)
    assert env["OMP_NUM_THREADS"] == "2" and "DS_ACCELERATOR" not in env  # an explicit choice is kept
    with pytest.raises(ConfigError, match="--node-rank"):
        World(nproc_per_node=1, nnodes="2", node_rank=2, rdzv_endpoint="h:1")


@pytest.mark.parametrize("total, largest, gpus, nodes", [(7_000_000_000, 250_000_000, 8, 4), (1_000_000, 10_000, 2, 1),
                                                         (300_000_000, 40_000_000, 4, 2)])
def test_memory_estimate_matches_deepspeed(total, largest, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from medfm.launch.memory import zero3_model_states

    for oo, op in ((False, False), (True, False), (True, True)):
        for zero_init in (True, False):
            ds_cpu, ds_gpu, ds_layer = estimate_zero3_model_states_mem_needs(
                total, largest, gpus, nodes, cpu_offload=oo, cpu_offload_params=op, zero_init=zero_init)
            ours = zero3_model_states(total, largest, gpus, nodes, offload_optimizer=oo, offload_params=op,
                                      zero_init=zero_init)
            assert (ours.device_bytes, ours.host_bytes, ours.largest_layer_bytes) == (ds_gpu, ds_cpu, ds_layer)


def test_model_count_on_meta_equals_real_build(config):
    from medfm.launch.memory import count_model
    from medfm.launch.resolve import resolve_config
    from medfm.model_zoo import build_multimodal
    from medfm.pretrain.objectives import PretrainModule, build_objective

    cfg = resolve_config(config)
    size = count_model(cfg)
    model = build_multimodal(cfg.model)
    real = PretrainModule(model, [build_objective(o, model) for o in cfg.objectives])
    assert size.how == "meta" and size.total_params == sum(p.numel() for p in real.parameters())
    biggest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in real.modules())
    assert size.largest_layer_params == biggest


RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", [p for p in RECIPES if not p.name.startswith("sweep")], ids=lambda p: p.name)
def test_recipes_validate_against_the_schema(recipe):
    from medfm.launch.resolve import resolve_config

    cfg = resolve_config(recipe)
    assert cfg.run_dir == f"runs/{cfg.name}"


def _sweep(tmp_path, base, **extra) -> Path:
    sweep = {"name": "sw", "base": str(base), "out": str(tmp_path / "sweep"), "nproc_per_node": 2,
             "sizes": [{"name": "w16", "overrides": {"model.towers.image.overrides.width": 16}},
                       {"name": "w64", "overrides": {"model.towers.image.overrides.width": 64}}],
             "budgets": [{"name": "d32", "samples": 32}, {"name": "c", "compute": 1e9}], **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_plan_dry_run(capsys, config, tmp_path):
    from medfm.launch.sweep import load_sweep, plan_points

    sweep, base = load_sweep(_sweep(tmp_path, config))
    planned = {p.point.name: p.facts for p in plan_points(sweep, base)}
    assert sorted(planned) == ["w16__c", "w16__d32", "w64__c", "w64__d32"]
    assert planned["w64__d32"]["params"] > planned["w16__d32"]["params"]
    assert planned["w16__d32"]["steps"] == 8 and planned["w16__d32"]["samples"] == 32  # 32 / (2 x 2 ranks)
    # A compute budget buys fewer samples for the bigger model.
    assert planned["w64__c"]["samples"] < planned["w16__c"]["samples"]
    assert planned["w16__c"]["planned_train_flops"] <= 1e9 + planned["w16__c"]["flops_per_sample"] * 4
    rc, out, _ = _run(capsys, "sweep", str(tmp_path / "sweep.yaml"), "--dry-run")
    assert rc == 0 and out.count("pending") == 4 and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("extra, expect", [
    ({"budgets": [{"name": "b", "samples": 8, "compute": 1e9}]}, "give exactly one of samples > 0 or compute > 0"),
    ({"sizes": [{"name": "a"}, {"name": "a"}]}, "sizes: duplicate name"),
    ({"sizes": [{"name": "a", "overrides": {"model.widht": 3}}]}, "sweep point a__d32: unknown config key 'model.widht'"),
])
def test_bad_sweep_is_one_line(capsys, config, tmp_path, extra, expect):
    path = _sweep(tmp_path, config, **extra)
    rc, _, err = _run(capsys, "sweep", str(path), "--dry-run")
    assert rc == 2 and expect in err and err.count("\n") == 1, err
