"""The demo's generated run config and eval suite are valid against the typed schemas (the full demo itself is
`make demo`, ~5 min), and its report compares pretrained vs random init row by row."""

from __future__ import annotations

import json

from medfm.demo.recipes import eval_suite, pretrain_config
from medfm.demo.report import comparison_plot
from medfm.demo.tasks import TASKS
from medfm.demo.verdict import compare, headline, verdict_lines


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
    # identical CIs [0.8, 1.0] on both sides: higher means, but nothing significant
    assert head["per_task"]["f"] == {"better_at": [], "worse_at": [], "not_significant_at": [2, 4],
                                     "verdict": "not significant"}
    assert head["beats_random_init"] is False
    assert "f: pretraining does NOT beat random init" in "\n".join(verdict_lines(head))
    assert comparison_plot(out, tmp_path / "cmp.png").stat().st_size > 1000


def test_verdict_reads_every_shot_count_and_says_when_pretraining_loses(tmp_path):
    """Old headline looked at 4 shots only: a task where random init is clearly better at 8 shots still read as
    "BEAT". Now every shot count counts, unstable rows never count as significant, and the text says so."""
    def rep(path, rows):
        path.write_text(json.dumps({"results": rows}))
        return path

    def few(task, k, value, ci, **extra):
        return {"task": f"{task}_fewshot", "metric": "auroc", "params": {"shots": k, "repeats": 10}, "value": value,
                "ci": ci, "n": 50, "n_patients": 20, **extra}

    pre = [few("mri2d", 4, 0.9, [0.85, 0.95]), few("mri2d", 8, 0.92, [0.88, 0.96]),
           few("mri3d", 4, 0.80, [0.70, 0.88]), few("mri3d", 8, 0.70, [0.60, 0.78]),
           few("ecg", 4, 0.99, [None, None], unstable=True, n_valid_resamples=300, n_resamples=500)]
    rnd = [few("mri2d", 4, 0.6, [0.5, 0.7]), few("mri2d", 8, 0.90, [0.85, 0.95]),
           few("mri3d", 4, 0.78, [0.70, 0.86]), few("mri3d", 8, 0.90, [0.85, 0.95]),
           few("ecg", 4, 0.5, [0.4, 0.6])]
    rows = compare(rep(tmp_path / "a.json", pre), rep(tmp_path / "b.json", rnd))
    head = headline(rows)
    assert head["per_task"]["mri2d"]["verdict"] == "better" and head["per_task"]["mri2d"]["better_at"] == [4]
    assert head["per_task"]["mri3d"]["verdict"] == "worse" and head["per_task"]["mri3d"]["worse_at"] == [8]
    assert head["per_task"]["ecg"]["verdict"] == "not significant"  # unstable: no interval, never significant
    assert head["beats_random_init"] is False
    text = "\n".join(verdict_lines(head))
    assert "do NOT beat" in text and "mri3d: pretraining does NOT beat random init" in text
    assert "not significant at shots [8]" in text and "5 few-shot AUROC comparisons" in text
    ecg = next(r for r in rows if r["task"] == "ecg_fewshot")
    assert ecg["pretrained_unstable"] == "300/500"


def test_one_significant_task_of_four_is_not_a_verdict(tmp_path):
    """16 comparisons at 95 %: one separated pair is what chance gives. A run better on 1 of 4 tasks (the rest not
    significant) read as "BEAT" before; the verdict now needs more than half of the tasks."""
    def few(task, k, value, ci):
        return {"task": f"{task}_fewshot", "metric": "auroc", "params": {"shots": k, "repeats": 10}, "value": value,
                "ci": ci, "n": 50, "n_patients": 20}

    tasks = ("a", "b", "c", "d")
    pre = [few(t, 4, 0.9 if t == "a" else 0.7, [0.85, 0.95] if t == "a" else [0.6, 0.8]) for t in tasks]
    rnd = [few(t, 4, 0.6 if t == "a" else 0.7, [0.5, 0.7] if t == "a" else [0.6, 0.8]) for t in tasks]
    (tmp_path / "a.json").write_text(json.dumps({"results": pre}))
    (tmp_path / "b.json").write_text(json.dumps({"results": rnd}))
    head = headline(compare(tmp_path / "a.json", tmp_path / "b.json"))
    assert head["per_task"]["a"]["verdict"] == "better" and head["tasks_better"] == "1 of 4"
    assert head["beats_random_init"] is False
    assert "do NOT beat" in "\n".join(verdict_lines(head))
    pre3 = [few(t, 4, 0.9, [0.85, 0.95]) if t != "d" else few(t, 4, 0.7, [0.6, 0.8]) for t in tasks]
    (tmp_path / "c.json").write_text(json.dumps({"results": pre3}))
    assert headline(compare(tmp_path / "c.json", tmp_path / "b.json"))["beats_random_init"] is True
