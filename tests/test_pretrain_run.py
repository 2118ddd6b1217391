"""In-process runs (a world of one): the transformers-LM objective, mlflow against a real server, config errors,
and the ``medfm pretrain`` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.pretrain.config import RunConfig, load_run_config  # noqa: E402
from medfm.schema import ConfigError, from_dict  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not become healthy")
        time.sleep(1)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def _run(cfg_dict):
    from medfm.pretrain.train import run

    return run(from_dict(RunConfig, cfg_dict))


def _falls(losses, name, k=2):
    first = sum(x[name] for x in losses[:k]) / k
    last = sum(x[name] for x in losses[-k:]) / k
    return last < first


def test_lm_objective_with_tiny_local_gpt2(tmp_path, shards):
    from transformers import GPT2Config, GPT2LMHeadModel

    lm_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        lm_dir, safe_serialization=True)
    objectives = [{"name": "lm:image", "lm_path": str(lm_dir)}, {"name": "mae:volume"}]
    cfg = run_config(tmp_path / "run", shards, objectives, ("image", "volume", "text"), steps=8,
                     train={"strategy": "ddp"})
    res = _run(cfg)
    assert res.status == "finished"
    for name in ("lm:image", "mae:volume"):
        assert _falls(res.losses, name), (name, [x[name] for x in res.losses])


def test_mlflow_server_params_metrics_tags_artifacts(tmp_path, shards, mlflow_server):
    from mlflow import MlflowClient

    cfg = run_config(tmp_path / "run", shards, [{"name": "mae:image"}, {"name": "contrastive:image-text"}],
                     ("image", "text"), steps=3, train={"strategy": "ddp"},
                     tracking={"enabled": True, "uri": mlflow_server, "experiment": "medfm-test"})
    res = _run(cfg)
    assert res.status == "finished" and res.run_id
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["objectives.0.name"] == "mae:image"
    assert run.data.tags["world_size"] == "1" and "git_commit" in run.data.tags
    assert any(k.startswith("manifest.") for k in run.data.tags)
    hist = client.get_metric_history(res.run_id, "loss/mae:image")
    assert [m.step for m in hist] == [1, 2, 3]
    assert hist[0].value == pytest.approx(res.losses[0]["mae:image"])
    for key in ("lr", "samples_per_s", "tokens_per_s", "mfu", "grad_norm/towers.image", "loss/total"):
        assert key in run.data.metrics, key
    names = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"config.yaml", "loss_curve.png"} <= names


def test_unreachable_tracking_server_warns_once_and_trains(tmp_path, shards):
    cfg = run_config(tmp_path / "run", shards, [{"name": "mae:image"}], ("image",), steps=2,
                     train={"strategy": "ddp"},
                     tracking={"enabled": True, "uri": f"http://127.0.0.1:{_free_port()}", "timeout_s": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _run(cfg)
    assert res.status == "finished" and res.step == 2
    assert sum("training continues without mlflow" in str(w.message) for w in caught) == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_config_errors_are_one_line(tmp_path, shards):
    base = run_config(tmp_path / "r", shards, [{"name": "mae:image"}], ("image",))
    bad = [
        ({"objectives": [{"name": "mae:text"}]}, "MAE needs one of"),
        ({"objectives": [{"name": "contrastive:image"}]}, "contrastive:<a>-<b>"),
        ({"objectives": [{"name": "contrastive:image-text"}]}, "needs model.towers.text"),
        ({"train": {**base["train"], "micro_batch": 3}}, "train.micro_batch (3) != data.batch_size (4)"),
        ({"train": {**base["train"], "global_batch": 6}}, "not a multiple"),
        ({"optim": {"lr": 0}}, "optim.lr must be > 0"),
    ]
    for patch, expected in bad:
        with pytest.raises(ConfigError, match=None) as err:
            from_dict(RunConfig, {**base, **patch})
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    cfg = from_dict(RunConfig, base)
    with pytest.raises(ConfigError, match=r"global_batch=8 != micro_batch\(4\) x grad_accum\(1\) x world_size\(1\)"):
        cfg.train.global_batch = 8
        cfg.check_world(1)


def test_cli_yaml_overrides_and_bad_key(tmp_path, shards):
    import yaml

    from medfm.launch.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path / "r", shards, [{"name": "mae:image"}], ("image",))))
    cfg = load_run_config(path, ["train.steps=7", "optim.lr=0.01"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01
    assert main(["pretrain", str(path), "train.stepz=1"]) == 2
    assert main(["pretrain", str(path), "train.steps=1", "train.strategy=ddp"]) == 0
    assert (tmp_path / "r" / "checkpoints" / "latest").is_file() is False  # checkpoint.final=false in the fixture


def test_ddp_checkpoint_resume_exact_keep_k_and_consolidate(tmp_path, shards):
    from medfm.pretrain.checkpoint import consolidate, model_state_dict

    objectives = [{"name": "mae:image"}, {"name": "contrastive:image-text"}]
    full = run_config(tmp_path / "run", shards, objectives, ("image", "text"), steps=6,
                      train={"strategy": "ddp"}, checkpoint={"every": 2, "keep": 2})
    first = _run(full)
    resumed = _run({**full, "checkpoint": {"every": 2, "keep": 2, "resume": "step4"}})
    assert resumed.losses == first.losses[4:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step4", "step6"]  # keep the newest 2
    assert (ckpts / "latest").read_text() == "step6"
    sd = model_state_dict(consolidate(ckpts))
    assert "towers.image.patch_embed.proj.weight" in sd or any(k.startswith("towers.image.") for k in sd)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _run({**full, "checkpoint": {"resume": "step5"}})
