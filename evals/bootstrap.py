"""Patient-level (cluster) bootstrap confidence intervals.

Samples of one patient are correlated (several studies, several images of one study), so resampling samples would
understate the uncertainty; we resample *patients* with replacement and take every sample of each drawn patient, as
is standard in clinical AI evaluation. Percentile intervals, seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medfm.evals.metrics import MetricError


@dataclass(frozen=True)
class Estimate:
    """A metric with its 95% (by default) confidence interval and the sizes it was measured on."""

    value: float
    low: float
    high: float
    n: int  # samples
    n_groups: int  # patients (clusters)
    n_boot: int  # resamples on which the metric was defined (undefined ones, e.g. single-class, are skipped)

    def to_dict(self) -> dict:
        return {"value": self.value, "ci": [self.low, self.high], "n": self.n, "n_patients": self.n_groups,
                "n_boot": self.n_boot}


def _group_index(groups: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def bootstrap_ci(metric: Callable[..., float], arrays: Sequence[np.ndarray], groups=None, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, min_valid: float = 0.5) -> Estimate:
    """Point estimate of ``metric(*arrays)`` and its ``1 - alpha`` percentile interval.

    ``groups`` (patient ids, one per sample) makes the resampling unit the patient; None resamples samples.
    Resamples where the metric is undefined (a draw with a single class for AUROC) are skipped; if more than
    ``1 - min_valid`` of them are, the interval is not trustworthy and MetricError says so.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise MetricError(f"bootstrap arrays have different lengths {[len(a) for a in arrays]}")
    value = float(metric(*arrays))  # raises MetricError (naming the reason) when undefined on the full set
    if groups is None:
        clusters = [np.array([i]) for i in range(n)]
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise MetricError(f"groups has {len(groups)} entries for {n} samples")
        clusters = _group_index(groups)
    g = len(clusters)
    if n_boot <= 0 or g < 2:
        return Estimate(value, math.nan, math.nan, n, g, 0)
    rng = np.random.default_rng(seed)
    sizes = np.array([len(c) for c in clusters])
    flat = np.concatenate(clusters)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    stats = []
    for _ in range(n_boot):
        draw = rng.integers(0, g, size=g)
        # Gather every member of each drawn patient without a Python loop over patients.
        lens = sizes[draw]
        offsets = np.repeat(starts[draw] - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(lens.sum())
        idx = flat[offsets]
        try:
            stats.append(float(metric(*(a[idx] for a in arrays))))
        except MetricError:
            continue
    if len(stats) < min_valid * n_boot:
        raise MetricError(f"bootstrap: metric undefined on {n_boot - len(stats)}/{n_boot} resamples "
                          f"(too few patients of a class: {g} patients)")
    stats = np.asarray(stats)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(low), float(high), n, g, len(stats))


def mean_ci(values, alpha: float = 0.05) -> Estimate:
    """Mean and Student-t interval of independent repeats (few-shot draws, seeds)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise MetricError("mean_ci: no values")
    m = float(v.mean())
    if v.size < 2:
        return Estimate(m, math.nan, math.nan, int(v.size), int(v.size), 0)
    half = float(stats.t.ppf(1 - alpha / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Estimate(m, m - half, m + half, int(v.size), int(v.size), int(v.size))
