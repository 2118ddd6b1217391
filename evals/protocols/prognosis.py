"""Prognosis: Cox proportional hazards on frozen features (lifelines), scored by Harrell's C-index with a
patient-level bootstrap CI.

Foundation-model features are wide (hundreds of dims) and survival sets small, so features are reduced by PCA fitted
on the training split, and the ridge penalty of the Cox fit is chosen on the validation split (or a patient hold-out
of train) by C-index, like the L2 sweep of the linear probe.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from medfm.evals import metrics as M
from medfm.evals.protocols.base import FeatureSplit, ProtocolError
from medfm.evals.protocols.linear import patient_holdout
from medfm.evals.scoring import Predictions


@dataclass
class CoxOptions:
    n_components: int = 16  # PCA dims (0 = use the standardised features as they are)
    penalizers: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    l1_ratio: float = 0.0
    val_fraction: float = 0.25
    seed: int = 0


class _Reducer:
    def __init__(self, x: np.ndarray, n_components: int):
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + 1e-6
        z = (x - self.mean) / self.std
        self.components = None
        if n_components and n_components < x.shape[1]:
            _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
            self.components = vt[: min(n_components, len(x) - 1)].T

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        return z if self.components is None else z @ self.components


def _check_survival(name: str, split: FeatureSplit, what: str) -> None:
    if split.event is None:
        raise ProtocolError(f"task {name}: {what} split has no event indicator (survival tasks need time + event)")
    if np.any(~np.isfinite(split.y.astype(np.float64))) or np.any(split.y.astype(np.float64) < 0):
        raise ProtocolError(f"task {name}: {what} split has missing or negative survival times")
    if what == "train" and int(np.sum(split.event)) == 0:
        raise ProtocolError(f"task {name}: the training split has no events; a Cox model cannot be fitted")


def _fit_cox(z: np.ndarray, time: np.ndarray, event: np.ndarray, penalizer: float, l1_ratio: float):
    import pandas as pd
    from lifelines import CoxPHFitter

    cols = [f"f{i}" for i in range(z.shape[1])]
    df = pd.DataFrame(z, columns=cols)
    df["T"], df["E"] = time.astype(np.float64), event.astype(np.int64)
    cph = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on near-collinear PCA dims; the penalty handles it
        cph.fit(df, duration_col="T", event_col="E")
    return cph, cols


def _risk(cph, cols, z: np.ndarray) -> np.ndarray:
    import pandas as pd

    return np.asarray(cph.predict_log_partial_hazard(pd.DataFrame(z, columns=cols)), dtype=np.float64)


def cox_prognosis(name: str, train: FeatureSplit, val: FeatureSplit | None, test: FeatureSplit,
                  opts: CoxOptions | None = None) -> tuple[Predictions, dict]:
    """``y`` holds survival times and ``event`` the 0/1 event indicator on every split."""
    opts = opts or CoxOptions()
    _check_survival(name, train, "train")
    _check_survival(name, test, "test")
    if val is None or len(val) == 0:
        fit_idx, hold_idx = patient_holdout(train, opts.val_fraction, opts.seed)
        fit, val = train.subset(fit_idx), train.subset(hold_idx)
    else:
        _check_survival(name, val, "val")
        fit = train
    reducer = _Reducer(fit.x, opts.n_components)
    zf, zv = reducer(fit.x), reducer(val.x)
    scores: dict[float, float] = {}
    for pen in opts.penalizers:
        try:
            cph, cols = _fit_cox(zf, fit.y, fit.event, pen, opts.l1_ratio)
            scores[pen] = M.concordance_index(val.y, _risk(cph, cols, zv), val.event)
        except (M.MetricError, ValueError, ArithmeticError):
            scores[pen] = -math.inf  # no comparable pairs in val / did not converge: not chosen
    best = max(scores, key=lambda p: (scores[p], p))  # ties → the stronger penalty (simpler model)
    full = FeatureSplit(np.concatenate([fit.x, val.x]), np.concatenate([fit.y, val.y]),
                        np.concatenate([fit.groups, val.groups]), event=np.concatenate([fit.event, val.event]))
    reducer = _Reducer(full.x, opts.n_components)
    try:
        cph, cols = _fit_cox(reducer(full.x), full.y, full.event, best, opts.l1_ratio)
    except Exception as exc:  # lifelines raises ConvergenceError (a bare Exception subclass) on degenerate data
        raise ProtocolError(f"task {name}: Cox model did not converge ({type(exc).__name__}: {exc})") from None
    risk = _risk(cph, cols, reducer(test.x))
    pred = Predictions("survival", test.y.astype(np.float64), risk, test.groups, event=test.event.astype(np.int64))
    return pred, {"penalizer": best, "val_c_index": {str(k): v for k, v in scores.items()},
                  "n_components": reducer.components.shape[1] if reducer.components is not None else fit.x.shape[1]}
