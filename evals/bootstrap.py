"""Patient-level (cluster) bootstrap confidence intervals.

Samples of one patient are correlated (several studies, several images of one study), so resampling samples would
understate the uncertainty; we resample *patients* with replacement and take every sample of each drawn patient, as
is standard in clinical AI evaluation. Percentile intervals, seeded, so a report is reproducible.

Every interval medfm reports comes from here, is clipped to the metric's range (``bounds``), and states how many
resamples it rests on: a resample where the metric is undefined (a single-class draw for AUROC) is not silently
dropped. When fewer than ``MIN_VALID_SHARE`` of the resamples are valid, the estimate is *unstable*: it keeps its
point value but no interval, and reports say "unstable" instead of a narrow interval computed on the lucky draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medfm.evals.metrics import MetricError

MIN_VALID_SHARE = 0.9  # below this share of valid resamples an interval is "unstable" (not printed)


@dataclass(frozen=True)
class Estimate:
    """A metric with its 95% (by default) confidence interval and the sizes it was measured on."""

    value: float
    low: float
    high: float
    n: int  # samples
    n_groups: int  # patients (clusters)
    n_boot: int  # resamples on which the metric was defined (undefined ones, e.g. single-class, are skipped)
    n_resamples: int = 0  # resamples drawn (n_boot of them valid)
    unstable: bool = False  # fewer than MIN_VALID_SHARE of the resamples were valid: no interval (low/high NaN)

    def to_dict(self) -> dict:
        return {"value": self.value, "ci": [self.low, self.high], "n": self.n, "n_patients": self.n_groups,
                "n_boot": self.n_boot, "n_resamples": self.n_resamples, "unstable": self.unstable}


def _group_index(groups: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def bootstrap_ci(metric: Callable[..., float], arrays: Sequence[np.ndarray], groups=None, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, min_valid: float = MIN_VALID_SHARE,
                 bounds: tuple[float, float] | None = None) -> Estimate:
    """Point estimate of ``metric(*arrays)`` and its ``1 - alpha`` percentile interval.

    ``groups`` (patient ids, one per sample) makes the resampling unit the patient; None resamples samples.
    Resamples where the metric is undefined (a draw with a single class for AUROC) are counted, not used; if fewer
    than ``min_valid`` of them are valid the estimate is unstable (no interval). ``bounds``: the metric's range, the
    interval is clipped to it.
    """
    draws = patient_resamples(groups, len(arrays[0]) if arrays else 0, n_boot, seed)
    return bootstrap_from_draws(metric, arrays, draws, n_boot, alpha, min_valid, bounds, _n_groups(groups, arrays))


def _n_groups(groups, arrays) -> int:
    return len(np.unique(np.asarray(groups))) if groups is not None else len(arrays[0]) if arrays else 0


def patient_resamples(groups, n: int, n_boot: int, seed: int = 0):
    """``n_boot`` seeded resamples of patients with replacement, each as the sample indices of its drawn patients
    (every sample of a drawn patient, as often as it was drawn); empty when there are fewer than 2 patients."""
    if groups is None:
        clusters = [np.array([i]) for i in range(n)]
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise MetricError(f"groups has {len(groups)} entries for {n} samples")
        clusters = _group_index(groups)
    g = len(clusters)
    if n_boot <= 0 or g < 2:
        return
    rng = np.random.default_rng(seed)
    sizes = np.array([len(c) for c in clusters])
    flat = np.concatenate(clusters)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    for _ in range(n_boot):
        draw = rng.integers(0, g, size=g)
        # Gather every member of each drawn patient without a Python loop over patients.
        lens = sizes[draw]
        offsets = np.repeat(starts[draw] - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(lens.sum())
        yield flat[offsets]


def interval(value: float, stats, n_resamples: int, n: int, n_groups: int, alpha: float = 0.05,
             min_valid: float = MIN_VALID_SHARE, bounds: tuple[float, float] | None = None) -> Estimate:
    """The Estimate of a point value and the metric on its valid resamples (``stats``, of ``n_resamples`` drawn)."""
    stats = np.asarray(stats, dtype=np.float64)
    if bounds is not None:
        value = float(np.clip(value, *bounds))
    if n_resamples <= 0:
        return Estimate(value, math.nan, math.nan, n, n_groups, 0, 0)
    if len(stats) < min_valid * n_resamples:
        return Estimate(value, math.nan, math.nan, n, n_groups, len(stats), n_resamples, unstable=True)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    if bounds is not None:
        low, high = np.clip([low, high], *bounds)
    return Estimate(value, float(low), float(high), n, n_groups, len(stats), n_resamples)


def bootstrap_from_draws(metric: Callable[..., float], arrays: Sequence[np.ndarray], draws, n_boot: int,
                         alpha: float = 0.05, min_valid: float = MIN_VALID_SHARE,
                         bounds: tuple[float, float] | None = None, n_groups: int | None = None) -> Estimate:
    """bootstrap_ci over given resamples (index arrays): the metric on each, undefined ones counted as invalid."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise MetricError(f"bootstrap arrays have different lengths {[len(a) for a in arrays]}")
    value = float(metric(*arrays))  # raises MetricError (naming the reason) when undefined on the full set
    stats, drawn = [], 0
    for idx in draws or ():
        drawn += 1
        try:
            stats.append(float(metric(*(a[idx] for a in arrays))))
        except MetricError:
            continue
    return interval(value, stats, drawn, n, n if n_groups is None else n_groups, alpha, min_valid, bounds)
