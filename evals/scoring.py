"""From a protocol's predictions to the metric table of a task: which metrics each task kind reports, each with its
patient-level bootstrap CI. Every protocol returns :class:`Predictions`; only this module decides metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from medfm.evals import metrics as M
from medfm.evals.bootstrap import Estimate, bootstrap_ci

TaskKind = Literal["binary", "multiclass", "ordinal", "multilabel", "survival"]
TASK_KINDS = ("binary", "multiclass", "ordinal", "multilabel", "survival")


@dataclass
class Predictions:
    """What a protocol predicted on the evaluation split.

    ``scores``: binary [n] P(positive); multi-class/ordinal [n, K] class probabilities; multi-label [n, L]
    per-label probabilities; survival [n] risk (high = early event). ``y_true``: ids [n], indicators [n, L], or for
    survival the pair (time [n], event [n]). ``groups``: patient ids used as bootstrap clusters.
    """

    kind: str
    y_true: np.ndarray
    scores: np.ndarray
    groups: np.ndarray
    class_names: list[str] = field(default_factory=list)
    event: np.ndarray | None = None  # survival only

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {list(TASK_KINDS)}, got {self.kind!r}")


def hard_predictions(kind: str, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    if kind == "binary":
        return (scores >= threshold).astype(np.int64)
    if kind == "multilabel":
        return (scores >= threshold).astype(np.int64)
    return np.argmax(scores, axis=1)


def metric_functions(kind: str, n_classes: int, class_names=None, specificity: float = 0.9) -> dict:
    """name -> fn(y_true, scores[, event]) for a task kind. Names are stable: reports and release cards key on them."""
    k = n_classes

    def hard(s):
        return hard_predictions(kind, s)

    if kind == "binary":
        return {
            "auroc": lambda y, s: M.auroc(y, s),
            "auprc": lambda y, s: M.auprc(y, s),
            "accuracy": lambda y, s: M.accuracy(y, hard(s)),
            "balanced_accuracy": lambda y, s: M.balanced_accuracy(y, hard(s), 2),
            "f1": lambda y, s: M.f1(y, hard(s), "binary", 2),
            "kappa": lambda y, s: M.cohen_kappa(y, hard(s), None, 2),
            f"sensitivity@spec{int(round(specificity * 100))}": lambda y, s: M.sensitivity_at_specificity(
                y, s, specificity),
        }
    if kind in ("multiclass", "ordinal"):
        out = {
            "accuracy": lambda y, s: M.accuracy(y, hard(s)),
            "balanced_accuracy": lambda y, s: M.balanced_accuracy(y, hard(s), k),
            "auroc_macro": lambda y, s: M.auroc(y, s, "macro", class_names),
            "auroc_micro": lambda y, s: M.auroc(y, s, "micro"),
            "auprc_macro": lambda y, s: M.auprc(y, s, "macro", class_names),
            "f1_macro": lambda y, s: M.f1(y, hard(s), "macro", k),
            "kappa": lambda y, s: M.cohen_kappa(y, hard(s), None, k),
        }
        if kind == "ordinal":
            out["kappa_quadratic"] = lambda y, s: M.cohen_kappa(y, hard(s), "quadratic", k)
        return out
    if kind == "multilabel":
        return {
            "auroc_macro": lambda y, s: M.auroc(y, s, "macro", class_names),
            "auroc_micro": lambda y, s: M.auroc(y, s, "micro"),
            "auprc_macro": lambda y, s: M.auprc(y, s, "macro", class_names),
            "auprc_micro": lambda y, s: M.auprc(y, s, "micro"),
            "f1_macro": lambda y, s: M.f1(y, hard(s), "macro"),
            "f1_micro": lambda y, s: M.f1(y, hard(s), "micro"),
            "subset_accuracy": lambda y, s: M.accuracy(y, hard(s)),
        }
    if kind == "survival":
        return {"c_index": lambda t, r, e: M.concordance_index(t, r, e)}
    raise ValueError(f"unknown task kind {kind!r}")


def metric_range(name: str) -> tuple[float, float]:
    """The range every metric of ``metric_functions`` lives in (bootstrap intervals are clipped to it)."""
    return (-1.0, 1.0) if name.startswith("kappa") else (0.0, 1.0)


def score(pred: Predictions, n_boot: int = 1000, seed: int = 0, specificity: float = 0.9,
          only: list[str] | None = None) -> dict[str, Estimate | str]:
    """Every metric of the task kind with its CI; a metric undefined on this split maps to its one-line reason."""
    n_classes = pred.scores.shape[1] if pred.scores.ndim == 2 else 2
    fns = metric_functions(pred.kind, n_classes, pred.class_names or None, specificity)
    if only:
        unknown = sorted(set(only) - set(fns))
        if unknown:
            raise ValueError(f"metrics {unknown} are not defined for a {pred.kind} task (have {sorted(fns)})")
        fns = {k: v for k, v in fns.items() if k in only}
    arrays = [pred.y_true, pred.scores] + ([pred.event] if pred.kind == "survival" else [])
    out: dict[str, Estimate | str] = {}
    for name, fn in fns.items():
        try:
            out[name] = bootstrap_ci(fn, arrays, groups=pred.groups, n_boot=n_boot, seed=seed,
                                     bounds=metric_range(name))
        except M.MetricError as exc:
            out[name] = str(exc)
    return out
