"""Few-shot probes: k labelled examples per class (k ∈ {1, 2, 4, 8, 16, ...}), repeated over seeded draws.

A single draw of 1-shot data is mostly noise about *which* example was drawn, so each k is repeated over seeded
draws and reported as the mean over draws. Its interval is a patient-level bootstrap of the *test set* with the
draws nested inside: each bootstrap replicate resamples test patients with replacement and resamples the draws with
replacement, and averages the metric of the chosen draws on the chosen patients. The interval therefore holds both the
test-set sampling error (which a Student-t over draws on one fixed test set ignores: it gave zero-width and >1
intervals) and the draw-to-draw variability, and like every medfm interval it stays inside the metric's range and
reports n / n_patients of the test set and its valid resamples (``medfm.evals.bootstrap``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medfm.evals.bootstrap import interval, patient_resamples
from medfm.evals.metrics import MetricError
from medfm.evals.protocols.base import FeatureSplit, ProtocolError, ProtocolResult, Row, TaskInfo
from medfm.evals.protocols.knn import KNNOptions, knn_probe
from medfm.evals.protocols.linear import LogisticOptions, logistic_probe
from medfm.evals.scoring import metric_functions, metric_range

DEFAULT_METRICS = {"binary": ["auroc", "balanced_accuracy"], "multiclass": ["balanced_accuracy", "auroc_macro"],
                   "ordinal": ["balanced_accuracy", "kappa_quadratic"], "multilabel": ["auroc_macro"]}


@dataclass
class FewShotOptions:
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    repeats: int = 5
    probe: str = "logistic"  # logistic | knn
    C: float = 1.0  # logistic: fixed L2 strength (a validation sweep with 1 example per class only adds noise)
    knn_k: int = 20
    metrics: list[str] = field(default_factory=list)  # "" = the kind's defaults (DEFAULT_METRICS)
    seed: int = 0


def draw_few_shot(task: TaskInfo, train: FeatureSplit, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` examples per class (multi-label: k positives and k negatives per finding, pooled)."""
    chosen: list[np.ndarray] = []
    if task.kind == "multilabel":
        pools = [np.flatnonzero(train.y[:, j] == v) for j in range(train.y.shape[1]) for v in (1, 0)]
    else:
        pools = [np.flatnonzero(train.y == c) for c in range(task.n_outputs)]
    for pool in pools:
        if len(pool) == 0:
            continue  # check_train_labels in the probe names the missing class
        chosen.append(rng.choice(pool, size=min(k, len(pool)), replace=False))
    return np.unique(np.concatenate(chosen))


def nested_estimate(fn, y, draws: list[np.ndarray], groups, n_boot: int, seed: int, bounds):
    """Mean over draws of ``fn(y, scores_r)`` with the nested patient x draw bootstrap interval (module doc)."""
    value = float(np.mean([fn(y, s) for s in draws]))  # MetricError when undefined on the whole test set
    rng = np.random.default_rng([seed, len(draws), 7])
    stats, drawn = [], 0
    for idx in patient_resamples(groups, len(y), n_boot, seed):
        drawn += 1
        picked, weight = np.unique(rng.integers(0, len(draws), size=len(draws)), return_counts=True)
        try:
            stats.append(float(np.average([fn(y[idx], draws[r][idx]) for r in picked], weights=weight)))
        except MetricError:
            continue
    return interval(value, stats, drawn, len(y), len(np.unique(groups)), bounds=bounds)


def few_shot(task: TaskInfo, train: FeatureSplit, val: FeatureSplit | None, test: FeatureSplit,
             opts: FewShotOptions | None = None, n_boot: int = 1000, seed: int = 0) -> ProtocolResult:
    opts = opts or FewShotOptions()
    if opts.probe not in ("logistic", "knn"):
        raise ProtocolError(f"task {task.name}: few-shot probe must be logistic|knn, got {opts.probe!r}")
    if opts.repeats < 1 or not opts.shots or min(opts.shots) < 1:
        raise ProtocolError(f"task {task.name}: few-shot needs repeats >= 1 and shots >= 1")
    fns = metric_functions(task.kind, task.n_outputs, task.class_names)
    names = opts.metrics or DEFAULT_METRICS[task.kind]
    unknown = [m for m in names if m not in fns]
    if unknown:
        raise ProtocolError(f"task {task.name}: few-shot metric {unknown[0]!r} not in {sorted(fns)}")
    rows: list[Row] = []
    info: dict = {}
    for k in opts.shots:
        scores: list[np.ndarray] = []
        sizes = []
        for r in range(opts.repeats):
            # One generator per (k, draw): adding a shot value never changes the draws of the others.
            rng = np.random.default_rng([opts.seed, k, r])
            sub = train.subset(draw_few_shot(task, train, k, rng))
            sizes.append(len(sub))
            if opts.probe == "knn":
                pred, _ = knn_probe(task, sub, None, test, KNNOptions(k=min(opts.knn_k, len(sub))))
            else:
                pred, _ = logistic_probe(task, sub, None, test, LogisticOptions(c_grid=(opts.C,), refine_steps=0,
                                                                                 seed=opts.seed))
            scores.append(pred.scores)
            y_true = pred.y_true
        for m in names:
            try:
                est = nested_estimate(fns[m], y_true, scores, test.groups, n_boot, seed, metric_range(m))
            except ValueError as exc:  # MetricError: undefined on the test set itself
                est = str(exc).splitlines()[0] or "undefined"
            rows.append(Row(m, est, {"shots": k, "repeats": opts.repeats}))
        info[f"{k}-shot train sizes"] = sorted(set(sizes))
    info["interval"] = "patient bootstrap of the test set, draws resampled inside each replicate"
    return ProtocolResult(rows, None, info)
