"""The demo's generated run config and eval suite are valid against the typed schemas (the full demo itself is
`make demo`, ~5 min), and its report compares pretrained vs random init row by row."""

from __future__ import annotations

import json

from medfm.launch.demo import compare, comparison_plot, eval_suite, headline, pretrain_config
from medfm.launch.demo_corpus import TASKS


def _corpus(tmp_path):
    datasets = {d: str(tmp_path / d) for d in ("real", "mri2d", "mri3d", "ecg", "ehr")}
    return {"datasets": datasets, "tasks": {k: vars(v) for k, v in TASKS.items()}}


def test_demo_run_config_validates_and_trains_every_tower(tmp_path):
    from medfm.pretrain.config import RunConfig
    from medfm.schema import from_dict

    cfg = from_dict(RunConfig, pretrain_config(_corpus(tmp_path), tmp_path / "run", steps=30))
    assert cfg.train.strategy == "zero3" and cfg.zero.stage3_param_persistence_threshold == 0
    trained = {m for o in cfg.objectives for m in o.modalities}
    assert trained == set(cfg.model.towers)  # no tower in the demo model is left without an objective
    kinds = {o.kind for o in cfg.objectives}
    assert {"mae", "contrastive", "caption"} <= kinds
    assert cfg.release.intended_use and "NOT for clinical use" in cfg.release.intended_use


def test_demo_eval_suite_validates(tmp_path):
    from medfm.evals.suite import load_suite

    suite = load_suite(eval_suite(_corpus(tmp_path), tmp_path))
    protos = {(t.name.rsplit("_", 1)[0], t.protocol) for t in suite.tasks}
    assert ("mri2d_tissue", "logistic") in protos and ("mri2d_tissue", "zeroshot") in protos
    assert all(t.classes for t in suite.tasks)


def test_compare_pairs_rows_and_skips_failed(tmp_path):
    def rep(path, rows):
        path.write_text(json.dumps({"results": rows}))
        return path

    row = {"task": "t", "metric": "auroc", "value": 0.9, "ci": [0.8, 1.0], "n": 10}
    a = rep(tmp_path / "a.json", [row, {**row, "metric": "f1", "value": None}])
    b = rep(tmp_path / "b.json", [{**row, "value": 0.6, "ci": [0.5, 0.7]}, {**row, "metric": "f1", "value": 0.5}])
    out = compare(a, b)
    assert out == [{"task": "t", "metric": "auroc", "pretrained": 0.9, "pretrained_ci": [0.8, 1.0],
                    "random_init": 0.6, "random_init_ci": [0.5, 0.7], "n": 10}]
    few = [{**row, "task": "f_fewshot", "params": {"shots": k, "repeats": 5}, "value": 0.5 + k / 10} for k in (2, 4)]
    a = rep(tmp_path / "a2.json", [{**row, "task": "t_logistic"}, *few])
    b = rep(tmp_path / "b2.json", [{**row, "task": "t_logistic", "value": 0.95, "ci": [0.9, 1.0]},
                                   *[{**f, "value": 0.5} for f in few]])
    out = compare(a, b)
    assert [r["metric"] for r in out] == ["auroc", "auroc (shots=2)", "auroc (shots=4)"]
    head = headline(out)
    assert head["linear_probe"] == {"tasks": 1, "wins": 0, "clear_wins": 0, "clear_losses": 0,
                                    "mean_pretrained": 0.9, "mean_random_init": 0.95}
    assert head["four_shot"] == {"tasks": 1, "wins": 1, "clear_wins": 0, "clear_losses": 0,
                                 "mean_pretrained": 0.9, "mean_random_init": 0.5}
    assert head["beats_random_init"] is True  # decided by the 4-shot probe, not the saturated full-label one
    assert comparison_plot(out, tmp_path / "cmp.png").stat().st_size > 1000
