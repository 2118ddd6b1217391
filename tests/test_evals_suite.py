"""End-to-end evals on a real task (grey vs white matter patches of nilearn's MNI152 template, written as medfm
shards): trained tower beats random init, suite → report/PNGs/CLI exit codes, failing tasks isolated, identical
features from checkpoint dir / state dict / release, on-disk cache, and a 2-process run (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from evals_realtasks import tiny_image_model_config  # noqa: E402

from medfm.demo.mni_tasks import write_mni_tissue_shards  # noqa: E402
from medfm.evals.data import index_split  # noqa: E402
from medfm.evals.features import ExtractOptions, extract, load_model, weights_hash  # noqa: E402
from medfm.evals.suite import load_suite, run_suite  # noqa: E402
from medfm.pretrain.world_env import env_outside_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITE = """
name: mni-tissue
n_boot: 100
batch_size: 64
tasks:
  - {name: tissue_logistic, data: {dir: DATA}, modality: image, kind: binary, label: tissue, classes: [grey, white],
     protocol: logistic, options: {c_grid: [0.01, 1.0, 100.0], refine_steps: 1}}
  - {name: tissue_knn, data: {dir: DATA}, modality: image, kind: binary, label: tissue, classes: [grey, white],
     protocol: knn}
  - {name: tissue_fewshot, data: {dir: DATA, val: null}, modality: image, kind: binary, label: tissue,
     classes: [grey, white], protocol: fewshot, options: {shots: [2, 8], repeats: 3}}
  - {name: no_such_label, data: {dir: DATA}, modality: image, kind: binary, label: grade, protocol: knn}
  - {name: no_ecg_tower, data: {dir: DATA}, modality: signal, kind: binary, label: tissue, classes: [grey, white],
     protocol: knn}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mni_tissue_shards(tmp_path_factory.mktemp("mni") / "shards")


@pytest.fixture(scope="module")
def model():
    from medfm.model_zoo import build_multimodal

    torch.manual_seed(0)
    return build_multimodal(tiny_image_model_config()).eval()


@pytest.fixture(scope="module")
def state_dict_file(model, tmp_path_factory):
    from safetensors.torch import save_file

    from medfm.schema import to_dict

    path = tmp_path_factory.mktemp("sd") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"medfm_model_config": json.dumps(to_dict(model.config))})
    return path


def _suite_file(tmp_path, data):
    p = tmp_path / "suite.yaml"
    p.write_text(SUITE.replace("DATA", str(data)))
    return p


def _probe_auroc(model, data, tmp_path):
    suite = load_suite(_suite_file(tmp_path, data), ["n_boot=0"])
    suite.tasks = suite.tasks[:1]
    (res,) = run_suite(suite, model, weights_hash(model), None, progress=False)
    assert res.status == "ok", res.error
    return {r.metric: r.estimate.value for r in res.rows}["auroc"]


def test_trained_tower_beats_random_init(model, data, tmp_path):
    """A few dozen supervised steps on the training patches must give features a linear probe separates better."""
    import copy

    from medfm.evals.data import read_samples
    from medfm.shards.collate import CollateConfig, collate
    from medfm.shards.plan import StepPlan

    random_auroc = _probe_auroc(model, data, tmp_path)
    trained = copy.deepcopy(model).train()
    index = index_split(data, "train")
    samples = read_samples(index, range(len(index)))
    batch = collate(samples, StepPlan(0, ("image",), (), "t"), CollateConfig(image_size=[16, 16], image_channels=1))
    y = torch.tensor([s.meta["labels"]["tissue"] == "white" for s in samples], dtype=torch.long)
    head = torch.nn.Linear(trained.towers["image"].width, 2)
    opt = torch.optim.AdamW(list(trained.parameters()) + list(head.parameters()), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        _, pooled = trained.encode("image", batch)
        loss = torch.nn.functional.cross_entropy(head(pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    trained_auroc = _probe_auroc(trained, data, tmp_path)
    assert trained_auroc > random_auroc + 0.03, (trained_auroc, random_auroc)
    assert trained_auroc > 0.9


def test_cli_suite_report_and_failed_tasks(state_dict_file, data, tmp_path):
    from medfm.launch.cli import main

    out = tmp_path / "out"
    rc = main(["eval", str(state_dict_file), "--suite", str(_suite_file(tmp_path, data)), "--out", str(out)])
    assert rc == 1  # two tasks fail on purpose; the rest still ran
    report = json.loads((out / "report.json").read_text())
    status = {t["task"]: t for t in report["tasks"]}
    assert status["tissue_logistic"]["status"] == "ok" and status["tissue_fewshot"]["status"] == "ok"
    assert "lack label 'grade'" in status["no_such_label"]["error"]
    assert "no 'signal' tower" in status["no_ecg_tower"]["error"]
    rows = [r for r in report["results"] if r["task"] == "tissue_logistic"]
    auroc = next(r for r in rows if r["metric"] == "auroc")
    assert auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1] and auroc["n"] == len(index_split(data, "test"))
    shots = {r["params"]["shots"] for r in report["results"] if r["task"] == "tissue_fewshot"}
    assert shots == {2, 8}
    assert (out / "tissue_logistic_roc_pr.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| tissue_logistic | logistic | auroc |" in md and "no_such_label" in md
    assert list((out / "features").glob("*.safetensors"))  # cached
    # Bad usage: exit 2 with one line, no report touched.
    assert main(["eval", str(tmp_path / "nope.safetensors"), "--suite", str(tmp_path / "missing.yaml")]) == 2


def test_checkpoint_state_dict_release_give_identical_features(model, state_dict_file, data, tmp_path):
    from safetensors.torch import save_file

    from medfm.schema import to_dict

    # A DDP-layout checkpoint as medfm.pretrain.checkpoint writes it (PretrainModule keys carry "model.").
    root = tmp_path / "checkpoints"
    tag = root / "step3"
    (tag / "client").mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
    (tag / "client" / "rank0.json").write_text(json.dumps({"step": 3, "config": {"model": to_dict(model.config)}}))
    (tag / "COMPLETE").write_text("{}")
    (root / "latest").write_text("step3")
    sources = {"checkpoint": root, "state_dict": state_dict_file}
    try:
        from medfm.model_zoo.release import save_release

        rel = tmp_path / "release"
        save_release(rel, model, model.config, {"name": "tiny", "version": "0.1"})
        sources["release"] = rel
    except ImportError:
        pass  # model_zoo release format not landed in this tree yet; the two other forms are still compared
    index = index_split(data, "test")
    feats, hashes = {}, {}
    for kind, src in sources.items():
        m, h, got_kind = load_model(src)
        assert got_kind == kind
        hashes[kind] = h
        feats[kind] = extract(m, h, index, "image", opts=ExtractOptions(batch_size=16)).pooled
    assert len(set(hashes.values())) == 1 and hashes["state_dict"] == weights_hash(model)
    for kind in feats:
        np.testing.assert_array_equal(feats[kind], feats["state_dict"])
    wrong = tmp_path / "wrong.safetensors"
    cfg = to_dict(model.config)
    cfg["towers"]["image"]["overrides"]["width"] = 64
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wrong),
              metadata={"medfm_model_config": json.dumps(cfg)})
    from medfm.evals.features import ModelSourceError

    with pytest.raises(ModelSourceError, match="weights do not match the model config"):
        load_model(wrong)


def test_feature_cache_is_keyed_and_reused(model, data, tmp_path):
    index = index_split(data, "val")
    h = weights_hash(model)
    opts = ExtractOptions(batch_size=32, cache_dir=str(tmp_path / "cache"))
    a = extract(model, h, index, "image", opts=opts)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    b = extract(model, h, index, "image", opts=opts)  # served from disk
    np.testing.assert_array_equal(a.pooled, b.pooled)
    assert b.keys == index.keys
    extract(model, "other-weights", index, "image", opts=opts)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


@pytest.mark.slow
def test_two_processes_match_one(state_dict_file, data, tmp_path):
    suite = _suite_file(tmp_path, data)
    env = {**env_outside_world(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "medfm.launch.cli", "eval", str(state_dict_file), "--suite", str(suite)]
    single = subprocess.run(cmd + ["--out", str(one)], env=env, timeout=600, capture_output=True, text=True)
    assert single.returncode == 1, single.stderr[-3000:]  # the two deliberately failing tasks
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "medfm.launch.cli", "eval", str(state_dict_file), "--suite", str(suite), "--out",
                           str(two)], env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the two deliberately failing tasks
    r1 = json.loads((one / "report.json").read_text())["results"]
    r2 = json.loads((two / "report.json").read_text())["results"]
    v1 = {(r["task"], r["metric"], json.dumps(r["params"])): (r["value"], r["n"]) for r in r1}
    v2 = {(r["task"], r["metric"], json.dumps(r["params"])): (r["value"], r["n"]) for r in r2}
    assert v1.keys() == v2.keys()
    for k in v1:
        assert v1[k][1] == v2[k][1]  # every sample exactly once
        assert v1[k][0] == pytest.approx(v2[k][0], abs=1e-6)


def test_periodic_hook_writes_a_cheap_report(model, data, tmp_path, monkeypatch):
    from medfm.evals.hook import periodic_eval

    monkeypatch.setenv("MEDFM_EVAL_SUITE", str(_suite_file(tmp_path, data)))
    monkeypatch.setenv("MEDFM_EVAL_MAX_SAMPLES", "40")
    model.train()
    values = periodic_eval(model, 7, tmp_path / "run")
    assert model.training  # mode restored for the training loop
    model.eval()
    report = json.loads((tmp_path / "run" / "evals" / "step7" / "report.json").read_text())
    assert report["model"]["step"] == 7
    assert 0.0 <= values["tissue_logistic/auroc"] <= 1.0
    assert next(r for r in report["results"] if r["metric"] == "auroc")["n"] <= 40
