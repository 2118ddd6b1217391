"""Scaling-law fits for sweep results (``medfm scaling fit``).

Three laws are fitted to final losses:

* ``L(N) = E + A·N^-α``      on the lower envelope over data (the best loss reached at each model size N),
* ``L(D) = E + B·D^-β``      on the lower envelope over model size (the best loss reached at each data size D),
* ``L(N, D) = E + A/N^α + B/D^β`` on every point.

Following Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2) each law is fitted in log space: minimise the
Huber loss (δ = 1e-3) between ``LSE(a − α·log N, b − β·log D, e)`` and ``log L`` (``A = e^a``, ``B = e^b``,
``E = e^e``) with L-BFGS, started from the best points of a coarse grid of initialisations, because the objective has
many poor local minima. Exponent intervals come from a non-parametric bootstrap over the points.

With compute ``C = k·N·D`` (k = 6 for dense transformers when D counts tokens; estimated from a measured
``train_flops`` column when the table has one) the joint law gives the compute-optimal allocation in closed form:
``N*(C) = G·(C/k)^{β/(α+β)}``, ``D*(C) = G⁻¹·(C/k)^{α/(α+β)}``, ``G = (αA / βB)^{1/(α+β)}``.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from medfm.schema import ConfigError

HUBER_DELTA = 1e-3
FLAT = 1e-6  # an exponent at or below this is a flat direction of the law (the fit's lower bound is 0)


# --------------------------------------------------------------------------------------------------- reading points
@dataclass
class Points:
    """Finished sweep points: model size N, data size D, final loss L (all > 0), plus optional measured FLOPs."""

    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # the sweep's budget name per point (IsoFLOP profiles)

    def subset(self, idx) -> Points:
        idx = np.asarray(idx, dtype=int)
        return Points(self.n[idx], self.d[idx], self.loss[idx], None if self.flops is None else self.flops[idx],
                      [self.labels[i] for i in idx] if self.labels else [],
                      [self.groups[i] for i in idx] if self.groups else [])


def read_points(path, n_col: str = "params", d_col: str = "samples", loss_col: str = "eval_loss",
                flops_col: str = "train_flops") -> Points:
    """Read a results CSV (as written by ``medfm sweep``). Rows with a ``status`` other than ``done`` are skipped.

    Every problem is a one-line ConfigError naming the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: results file not found")
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            header = list(rows[0].keys()) if rows else []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a readable CSV ({exc})") from None
    if not rows:
        raise ConfigError(f"{path}: no data rows (expected a header and one row per sweep point)")
    for col in (n_col, d_col, loss_col):
        if col not in header:
            hint = difflib.get_close_matches(col, header, n=1, cutoff=0.4)
            hint_text = f" (did you mean '{hint[0]}'?)" if hint else f" (columns: {', '.join(header)})"
            raise ConfigError(f"{path}: missing column '{col}'{hint_text}")
    has_flops = flops_col in header
    n, d, loss, flops, labels, groups = [], [], [], [], [], []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        if row.get("status", "done") not in ("done", "", None):
            continue
        values = []
        for col in (n_col, d_col, loss_col):
            text = (row.get(col) or "").strip()
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{path}: line {i}, column '{col}': expected a number, got {text!r}") from None
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{path}: line {i}, column '{col}': expected a finite number > 0, got {text!r}")
            values.append(value)
        n.append(values[0])
        d.append(values[1])
        loss.append(values[2])
        if has_flops:
            try:
                flops.append(float(row.get(flops_col) or "nan"))
            except ValueError:
                flops.append(float("nan"))
        labels.append(row.get("name") or f"line{i}")
        groups.append(row.get("budget") or "")
    if len(n) < 6:
        raise ConfigError(f"{path}: {len(n)} finished points; the joint law has 5 parameters, so at least 6 are needed")
    points = Points(np.array(n), np.array(d), np.array(loss), np.array(flops) if has_flops else None, labels,
                    groups if any(groups) else [])
    if len(np.unique(points.n)) < 2 or len(np.unique(points.d)) < 2:
        raise ConfigError(f"{path}: need at least 2 distinct values of '{n_col}' and of '{d_col}'")
    return points


# --------------------------------------------------------------------------------------------------- the fitter
@dataclass
class LawFit:
    """``log L = LSE(a_j − α_j·log X_j, e)``; ``coef`` = A_j = e^{a_j}, ``exponents`` = α_j, ``E`` = e^e."""

    variables: tuple[str, ...]
    E: float
    coef: tuple[float, ...]
    exponents: tuple[float, ...]
    objective: float
    rmse_log: float
    n_points: int

    def predict(self, *xs) -> np.ndarray:
        terms = [np.log(c) - a * np.log(np.asarray(x, dtype=float)) for c, a, x in zip(self.coef, self.exponents, xs)]
        terms.append(np.full_like(terms[0], math.log(self.E)))
        return np.exp(logsumexp(np.stack(terms), axis=0))

    @property
    def theta(self) -> np.ndarray:
        return np.concatenate([np.log(self.coef), self.exponents, [math.log(self.E)]])


def _huber(r: np.ndarray, delta: float):
    """Huber value and derivative, both scaled by 1/δ² so the objective is O(1) for L-BFGS's relative tolerances."""
    absr = np.abs(r)
    quad = absr <= delta
    value = np.where(quad, 0.5 * r**2, delta * (absr - 0.5 * delta)) / delta**2
    grad = np.where(quad, r, delta * np.sign(r)) / delta**2
    return value, grad


def _objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float):
    """Huber objective and its analytic gradient. ``theta = (a_1..a_k, α_1..α_k, e)``, ``logx`` is [n, k]."""
    k = logx.shape[1]
    a, alpha, e = theta[:k], theta[k:2 * k], theta[2 * k]
    z = np.concatenate([a[None, :] - alpha[None, :] * logx, np.full((len(logy), 1), e)], axis=1)  # [n, k+1]
    zmax = z.max(axis=1, keepdims=True)  # hand-written log-sum-exp/softmax: scipy's add ~10x overhead at this size
    ez = np.exp(z - zmax)
    total = ez.sum(axis=1, keepdims=True)
    pred = (zmax + np.log(total))[:, 0]
    value, dr = _huber(pred - logy, delta)
    w = ez / total * dr[:, None]  # d objective / d z
    grad = np.concatenate([w[:, :k].sum(0), -(w[:, :k] * logx).sum(0), [w[:, k].sum()]])
    return value.sum() / len(logy), grad / len(logy)


def _init_grid(logy: np.ndarray, k: int) -> np.ndarray:
    """Coarse grid of starts: the Chinchilla grid, with log E placed below the smallest observed log loss."""
    a_vals = np.arange(0.0, 25.01, 5.0)
    alpha_vals = np.arange(0.0, 2.01, 0.5)
    e_vals = np.linspace(logy.min() - 3.0, logy.min() - 0.01, 5)
    axes = [a_vals] * k + [alpha_vals] * k + [e_vals]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2 * k + 1)


def _grid_values(grid: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float, chunk: int = 4096) -> np.ndarray:
    k = logx.shape[1]
    out = np.empty(len(grid))
    for s in range(0, len(grid), chunk):
        g = grid[s:s + chunk]
        z = g[:, None, :k] - g[:, None, k:2 * k] * logx[None]  # [G, n, k]
        z = np.concatenate([z, np.broadcast_to(g[:, None, 2 * k:], z.shape[:2] + (1,))], axis=2)
        value, _ = _huber(logsumexp(z, axis=2) - logy[None], delta)
        out[s:s + chunk] = value.mean(1)
    return out


def fit_law(xs: list[np.ndarray], loss: np.ndarray, variables: tuple[str, ...], starts: np.ndarray | None = None,
            n_starts: int = 8, delta: float = HUBER_DELTA) -> LawFit:
    """Fit ``L = E + Σ_j A_j·X_j^-α_j`` by Huber-in-log-space L-BFGS from the best ``n_starts`` grid points
    (or from the given ``starts``), keeping the best local optimum."""
    logx = np.log(np.stack(xs, axis=1).astype(float))
    logy = np.log(np.asarray(loss, dtype=float))
    k = logx.shape[1]
    if starts is None:
        grid = _init_grid(logy, k)
        starts = grid[np.argsort(_grid_values(grid, logx, logy, delta))[:n_starts]]
    # Optimise with centred log-variables (a' = a − α·mean log X): the same optimum, but a' and α are no longer
    # strongly correlated, so L-BFGS converges in a few dozen iterations instead of hundreds.
    centre = logx.mean(0)
    bounds = [(None, None)] * k + [(0.0, 5.0)] * k + [(None, None)]
    best = None
    for start in np.atleast_2d(starts):
        x0 = start.copy()
        x0[:k] = start[:k] - start[k:2 * k] * centre
        res = minimize(_objective, x0, args=(logx - centre, logy, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 3000, "ftol": 1e-12, "gtol": 1e-7})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    theta = best.x.copy()
    theta[:k] = best.x[:k] + best.x[k:2 * k] * centre
    z = np.concatenate([theta[:k][None] - theta[k:2 * k][None] * logx, np.full((len(logy), 1), theta[2 * k])], axis=1)
    rmse = float(np.sqrt(np.mean((logsumexp(z, axis=1) - logy) ** 2)))
    return LawFit(variables=variables, E=float(math.exp(theta[2 * k])), coef=tuple(np.exp(theta[:k]).tolist()),
                  exponents=tuple(theta[k:2 * k].tolist()), objective=float(best.fun), rmse_log=rmse,
                  n_points=len(logy))


def lower_envelope(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best (lowest) loss at each distinct x: the 'other resource is not the bottleneck' points for a 1-D law."""
    ux = np.unique(x)
    return ux, np.array([loss[x == v].min() for v in ux])


# --------------------------------------------------------------------------------------------------- compute-optimal
def compute_optimal(fit: LawFit, compute: np.ndarray, k_flops: float):
    """N*(C), D*(C), L*(C) of the joint law under ``C = k·N·D`` (closed form; see the module docstring)."""
    (A, B), (alpha, beta) = fit.coef, fit.exponents
    compute = np.asarray(compute, dtype=float)
    if alpha <= FLAT or beta <= FLAT:  # a flat direction: no interior optimum
        nan = np.full_like(compute, np.nan)
        return nan, nan, nan
    g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    n_opt = g * (compute / k_flops) ** (beta / (alpha + beta))
    d_opt = (compute / k_flops) / n_opt
    return n_opt, d_opt, fit.predict(n_opt, d_opt)


def estimate_flops_factor(points: Points) -> tuple[float, str]:
    """k in C = k·N·D: the median measured ``train_flops/(N·D)`` when the table has it, else 6 (the dense rule)."""
    if points.flops is not None:
        ratio = points.flops / (points.n * points.d)
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if len(ratio):
            return float(np.median(ratio)), "measured train_flops/(N·D), median over points"
    return 6.0, "C ≈ 6·N·D rule"


# --------------------------------------------------------------------------------------------------- full study
@dataclass
class Budget:
    name: str
    flops: float


def parse_budget(text: str) -> Budget:
    """``NAME=FLOPS`` or just ``FLOPS`` (e.g. ``gpu-week=3e20``)."""
    name, _, value = text.rpartition("=")
    try:
        flops = float(value)
    except ValueError:
        raise ConfigError(f"--budget {text!r}: expected NAME=FLOPS with a number, e.g. 'gpu-week=3e20'") from None
    if not math.isfinite(flops) or flops <= 0:
        raise ConfigError(f"--budget {text!r}: FLOPS must be a finite number > 0")
    return Budget(name or f"{flops:.3g}", flops)


# --------------------------------------------------------------------------------------------------- approach 2
def point_compute(points: Points, k_flops: float) -> np.ndarray:
    """Training compute of each point: the trainer's recorded ``train_flops`` where the table has it, else k·N·D."""
    c = k_flops * points.n * points.d
    if points.flops is not None:
        ok = np.isfinite(points.flops) & (points.flops > 0)
        c = np.where(ok, points.flops, c)
    return c


def isoflop_groups(points: Points, compute: np.ndarray, rel_tol: float = 0.25) -> list[np.ndarray]:
    """Indices of the points of each compute budget. The sweep's ``budget`` column groups them when every group's
    compute is the same within ``rel_tol`` (a ``compute:`` budget: whole batches round it a little); otherwise points
    are clustered by compute within ``rel_tol`` (a ``samples:`` budget spends different compute per model size)."""
    if points.groups:
        out = [np.array([i for i, g in enumerate(points.groups) if g == name]) for name in dict.fromkeys(points.groups)]
        if all(compute[g].max() / compute[g].min() <= 1 + rel_tol for g in out):
            return out
    order = np.argsort(compute)
    out, cur = [], [order[0]]
    for i in order[1:]:
        if compute[i] / compute[cur[0]] <= 1 + rel_tol:
            cur.append(i)
        else:
            out.append(np.array(cur))
            cur = [i]
    out.append(np.array(cur))
    return out


@dataclass
class IsoFlopProfile:
    compute: float      # geometric mean of the group's compute
    n_points: int
    n_opt: float        # loss-minimising N of the parabola in log N (nan without an interior minimum)
    loss_opt: float
    bracketed: bool     # the minimum lies inside the sampled N range
    curvature: float    # the parabola's coefficient of (log N)^2 (> 0 for a minimum)


def isoflop_profile(n: np.ndarray, loss: np.ndarray, compute: float) -> IsoFlopProfile:
    """Chinchilla approach 2 for one budget: ``log L = a·(log N)² + b·log N + c``, minimum at ``log N = -b/2a``."""
    x, y = np.log(n), np.log(loss)
    if len(np.unique(x)) < 3:
        return IsoFlopProfile(compute, len(n), math.nan, math.nan, False, math.nan)
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return IsoFlopProfile(compute, len(n), math.nan, math.nan, False, float(a))
    x_opt = -b / (2 * a)
    return IsoFlopProfile(compute, len(n), float(math.exp(x_opt)), float(math.exp(a * x_opt**2 + b * x_opt + c)),
                          bool(x.min() <= x_opt <= x.max()), float(a))


def _power_fit(c: np.ndarray, n_opt: np.ndarray) -> tuple[float, float]:
    """``N* = G·C^a`` by least squares in log space -> (a, log G)."""
    a, log_g = np.polyfit(np.log(c), np.log(n_opt), 1)
    return float(a), float(log_g)


def approach2(points: Points, compute: np.ndarray) -> dict:
    """IsoFLOP profiles and the power law N*(C) through their minima (only bracketed minima are used)."""
    profiles = [isoflop_profile(points.n[g], points.loss[g], float(np.exp(np.log(compute[g]).mean())))
                for g in isoflop_groups(points, compute)]
    used = [p for p in profiles if p.bracketed]
    out = {"profiles": [asdict(p) for p in profiles], "n_used": len(used), "a": math.nan, "log_g": math.nan}
    if len(used) >= 2:
        out["a"], out["log_g"] = _power_fit(np.array([p.compute for p in used]), np.array([p.n_opt for p in used]))
    return out


def approach2_optimum(fit: dict, compute, k_flops: float):
    """N*(C) and D*(C) = C / (k·N*) of an approach-2 fit (nan when it has no exponent)."""
    compute = np.asarray(compute, dtype=float)
    if not math.isfinite(fit["a"]):
        return np.full_like(compute, np.nan), np.full_like(compute, np.nan)
    n_opt = np.exp(fit["log_g"]) * compute ** fit["a"]
    return n_opt, compute / (k_flops * n_opt)


# --------------------------------------------------------------------------------------------------- holdout
def split_holdout(points: Points, spec: list[str], k_flops: float | None = None) -> tuple[Points, Points]:
    """``largest``: the point(s) of the largest compute budget (the IsoFLOP group of the largest point, or the
    single largest point when budgets are not shared); otherwise point names. Returns (fit set, held-out set)."""
    k = k_flops if k_flops is not None else estimate_flops_factor(points)[0]
    compute = point_compute(points, k)
    names = [x for item in spec for x in item.split(",") if x]
    if names == ["largest"]:
        groups = isoflop_groups(points, compute)
        top = max(groups, key=lambda g: compute[g].max())
        held = list(top) if len(top) < len(points.n) - 5 else [int(np.argmax(compute))]
    else:
        unknown = [x for x in names if x not in points.labels]
        if unknown:
            raise ConfigError(f"--holdout {unknown[0]!r}: no finished point of that name (points: "
                              f"{', '.join(points.labels)})")
        held = [points.labels.index(x) for x in names]
    rest = [i for i in range(len(points.n)) if i not in held]
    if len(rest) < 6:
        raise ConfigError(f"--holdout: {len(rest)} points left to fit; the joint law needs at least 6")
    fit_set = points.subset(rest)
    if len(np.unique(fit_set.n)) < 2 or len(np.unique(fit_set.d)) < 2:
        raise ConfigError("--holdout: the remaining points need at least 2 distinct N and 2 distinct D")
    return fit_set, points.subset(held)


def holdout_report(held: Points, joint: LawFit, boot_preds: list[np.ndarray], residuals: np.ndarray,
                   seed: int = 0, level: float = 0.95) -> list[dict]:
    """Predicted vs measured loss of each held-out point. The prediction interval combines the fit's uncertainty
    (the bootstrap refits' predictions ``L_b``) with the scatter of a single point around the law: ``L_b · exp(ε)``,
    ``ε ~ N(0, s²)``, ``s`` = the fit's log-residual RMS with the degrees-of-freedom correction ``sqrt(n / (n − 5))``
    (a 5-parameter fit's residuals are smaller than the noise); percentiles over (b, ε)."""
    pred = joint.predict(held.n, held.d)
    rng = np.random.default_rng(seed)
    n = len(residuals)
    scale = float(np.sqrt(np.sum(residuals**2) / max(1, n - 5))) if n else math.nan
    boot = np.array(boot_preds) if boot_preds else np.full((0, len(held.n)), np.nan)
    out = []
    for j in range(len(held.n)):
        col = boot[:, j][np.isfinite(boot[:, j])] if len(boot) else np.array([])
        if len(col) >= 2 and len(residuals):
            draws = col[:, None] * np.exp(rng.normal(0.0, scale, size=(len(col), 50)))
            lo, hi = _interval(draws.ravel(), level)
        else:
            lo, hi = math.nan, math.nan
        out.append({"name": held.labels[j] if held.labels else f"holdout{j}", "n": float(held.n[j]),
                    "d": float(held.d[j]), "measured": float(held.loss[j]), "predicted": float(pred[j]),
                    "interval": [lo, hi], "rel_error": float(pred[j] / held.loss[j] - 1),
                    "inside": bool(lo <= held.loss[j] <= hi)})
    return out


# --------------------------------------------------------------------------------------------------- identifiability
EXPONENT_BOUND = 5.0  # fit_law's bound on every exponent


def identification_warnings(report) -> list[str]:
    """Plain sentences for what the data cannot identify (an empty list when every quantity is pinned down)."""
    out = []
    iv, j = report.intervals, report.joint
    for key, name, value in (("alpha", "α (the N exponent)", j["exponents"][0]),
                             ("beta", "β (the D exponent)", j["exponents"][1])):
        lo, hi = iv.get(key, [math.nan, math.nan])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            out.append(f"{name}: no bootstrap interval (too few usable refits), so the data do not identify it")
        elif hi >= EXPONENT_BOUND - 1e-3 or lo <= 1e-3 or value >= EXPONENT_BOUND - 1e-3 or value <= 1e-3:
            out.append(f"{name} is not identified by these points: its estimate or interval [{lo:.3g}, {hi:.3g}] "
                       f"reaches the fit's bound (0 or {EXPONENT_BOUND:g})")
        elif hi - lo > max(0.5, abs(value)):
            out.append(f"{name} is poorly identified: interval [{lo:.3g}, {hi:.3g}] is wider than the estimate")
    if j["E"] < 1e-3 * report.min_loss:
        out.append(f"E (irreducible loss) → {j['E']:.3g}: the points do not reach the loss floor, so E is not "
                   "identified and the exponents absorb it")
    a2 = report.approach2
    if a2["n_used"] < 2:
        nb = sum(not p["bracketed"] for p in a2["profiles"])
        out.append(f"approach 2: {a2['n_used']} of {len(a2['profiles'])} compute budgets have a loss minimum inside "
                   f"their sampled N range ({nb} not bracketed), so the IsoFLOP exponent is not identified (needs 2+)")
    else:
        lo, hi = iv.get("a2_exponent", [math.nan, math.nan])
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo > 0.5:
            out.append(f"approach 2: the N*(C) exponent's interval [{lo:.3g}, {hi:.3g}] is too wide to identify it")
    return out


# --------------------------------------------------------------------------------------------------- full study
@dataclass
class ScalingReport:
    n_points: int
    flops_factor: float
    flops_factor_source: str
    law_n: dict
    law_d: dict
    joint: dict
    intervals: dict          # name -> [lo, hi] (bootstrap percentile)
    bootstrap: int
    extrapolation: list      # per budget: C, N*, D*, L* (approach 3) and N*, D* (approach 2) with intervals
    variables: dict
    approach2: dict = field(default_factory=dict)
    holdout: list = field(default_factory=list)   # per held-out point: measured, predicted, interval
    min_loss: float = math.nan
    warnings: list = field(default_factory=list)  # what the data cannot identify, in words


def _interval(values, level=0.95):
    values = np.asarray([v for v in np.ravel(values) if np.isfinite(v)])
    if len(values) < 2:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _n_opt_exponent(alpha: float, beta: float) -> float:
    """a in N* ∝ C^a of the joint law, β/(α+β); undefined (nan) when either direction is flat."""
    return beta / (alpha + beta) if min(alpha, beta) > FLAT else math.nan


def fit_all(points: Points, budgets: list[Budget] | None = None, n_boot: int = 200, seed: int = 0,
            names: tuple[str, str] = ("N", "D"), progress: bool = False,
            holdout: Points | None = None) -> tuple[ScalingReport, dict]:
    """Fit the three laws (approach 3) and the IsoFLOP profiles (approach 2), bootstrap both, extrapolate the
    compute-optimal frontier to ``budgets`` and, with ``holdout``, predict the held-out points.

    Returns the report (JSON-able) and the fitted objects (for plotting)."""
    k_flops, k_source = estimate_flops_factor(points)
    compute = point_compute(points, k_flops)
    env_n = lower_envelope(points.n, points.loss)
    env_d = lower_envelope(points.d, points.loss)
    law_n = fit_law([env_n[0]], env_n[1], (names[0],)) if len(env_n[0]) >= 3 else None
    law_d = fit_law([env_d[0]], env_d[1], (names[1],)) if len(env_d[0]) >= 3 else None
    joint = fit_law([points.n, points.d], points.loss, names)
    a2 = approach2(points, compute)
    if not budgets:
        c_max = float(max(compute.max(), (k_flops * points.n * points.d).max()))
        budgets = [Budget("100x-largest-point", 100 * c_max)]
    c_budget = np.array([b.flops for b in budgets])
    n_star, d_star, l_star = compute_optimal(joint, c_budget, k_flops)
    n2_star, d2_star = approach2_optimum(a2, c_budget, k_flops)

    # Bootstrap: resample points with replacement and refit.
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {k: [] for k in ("alpha", "beta", "E", "a_N_exponent", "alpha_N_only", "beta_D_only",
                                                "a2_exponent")}
    star_samples = [[] for _ in budgets]
    star2_samples = [[] for _ in budgets]
    boot_preds = []
    groups = isoflop_groups(points, compute)
    iterator = range(n_boot)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="bootstrap", unit="fit")
    for _ in iterator:
        idx = rng.integers(0, len(points.n), len(points.n))
        if len(np.unique(points.n[idx])) < 2 or len(np.unique(points.d[idx])) < 2:
            continue
        # Warm start from the full-data optimum: a resample's optimum is near it, and grid restarts per resample
        # would dominate the cost without changing the intervals.
        bj = fit_law([points.n[idx], points.d[idx]], points.loss[idx], names, starts=joint.theta[None])
        samples["alpha"].append(bj.exponents[0])
        samples["beta"].append(bj.exponents[1])
        samples["E"].append(bj.E)
        samples["a_N_exponent"].append(_n_opt_exponent(*bj.exponents))
        for law, x, key in ((law_n, points.n, "alpha_N_only"), (law_d, points.d, "beta_D_only")):
            ex, ey = lower_envelope(x[idx], points.loss[idx])
            if law is not None and len(ex) >= 3:
                samples[key].append(fit_law([ex], ey, law.variables, starts=law.theta[None]).exponents[0])
        bn, bd, bl = compute_optimal(bj, c_budget, k_flops)
        for j in range(len(budgets)):
            star_samples[j].append((bn[j], bd[j], bl[j]))
        if holdout is not None:
            boot_preds.append(bj.predict(holdout.n, holdout.d))
        # Approach 2: resample within each budget (a budget keeps its points' N values on average).
        bidx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        b2 = approach2(Points(points.n[bidx], points.d[bidx], points.loss[bidx],
                              None if points.flops is None else points.flops[bidx],
                              groups=[points.groups[i] for i in bidx] if points.groups else []), compute[bidx])
        samples["a2_exponent"].append(b2["a"])
        b2n, b2d = approach2_optimum(b2, c_budget, k_flops)
        for j in range(len(budgets)):
            star2_samples[j].append((b2n[j], b2d[j]))

    intervals = {k: _interval(v) for k, v in samples.items()}
    extrapolation = []
    for j, b in enumerate(budgets):
        arr = np.array(star_samples[j]) if star_samples[j] else np.full((0, 3), np.nan)
        arr2 = np.array(star2_samples[j]) if star2_samples[j] else np.full((0, 2), np.nan)
        extrapolation.append({
            "name": b.name, "compute": b.flops,
            "n_opt": float(n_star[j]), "n_opt_interval": _interval(arr[:, 0]),
            "d_opt": float(d_star[j]), "d_opt_interval": _interval(arr[:, 1]),
            "loss": float(l_star[j]), "loss_interval": _interval(arr[:, 2]),
            "a2_n_opt": float(n2_star[j]), "a2_n_opt_interval": _interval(arr2[:, 0]),
            "a2_d_opt": float(d2_star[j]), "a2_d_opt_interval": _interval(arr2[:, 1]),
        })
    held = []
    if holdout is not None:
        logx = np.log(joint.predict(points.n, points.d)) - np.log(points.loss)
        held = holdout_report(holdout, joint, boot_preds, -logx, seed=seed)
    report = ScalingReport(
        n_points=len(points.n), flops_factor=k_flops, flops_factor_source=k_source,
        law_n=asdict(law_n) if law_n else {}, law_d=asdict(law_d) if law_d else {},
        joint={**asdict(joint), "n_opt_exponent": _n_opt_exponent(*joint.exponents),
               "d_opt_exponent": 1 - _n_opt_exponent(*joint.exponents)},
        intervals=intervals, bootstrap=len(samples["alpha"]), extrapolation=extrapolation,
        variables={"N": names[0], "D": names[1]}, approach2=a2, holdout=held, min_loss=float(points.loss.min()),
    )
    report.warnings = identification_warnings(report)
    return report, {"law_n": law_n, "law_d": law_d, "joint": joint, "k_flops": k_flops, "budgets": budgets,
                    "compute": compute, "holdout": holdout}


def _iv(pair, fmt=".3g") -> str:
    lo, hi = pair
    return f"[{lo:{fmt}}, {hi:{fmt}}]" if math.isfinite(lo) and math.isfinite(hi) else "[not identified]"


def format_report(report: ScalingReport) -> str:
    """Human-readable summary printed by ``medfm scaling fit``."""
    iv = report.intervals
    j = report.joint
    lines = [f"{report.n_points} points, {report.bootstrap} bootstrap refits, 95% percentile intervals"]
    if report.law_n:
        ln = report.law_n
        lines.append(f"L(N)   = {ln['E']:.4g} + {ln['coef'][0]:.4g}·N^-{ln['exponents'][0]:.3f}"
                     f"   α ∈ {_iv(iv['alpha_N_only'])}   rmse(log) {ln['rmse_log']:.4f}")
    if report.law_d:
        ld = report.law_d
        lines.append(f"L(D)   = {ld['E']:.4g} + {ld['coef'][0]:.4g}·D^-{ld['exponents'][0]:.3f}"
                     f"   β ∈ {_iv(iv['beta_D_only'])}   rmse(log) {ld['rmse_log']:.4f}")
    lines.append(f"approach 3: L(N,D) = {j['E']:.4g} + {j['coef'][0]:.4g}/N^{j['exponents'][0]:.3f} + "
                 f"{j['coef'][1]:.4g}/D^{j['exponents'][1]:.3f}   rmse(log) {j['rmse_log']:.4f}")
    lines.append(f"         α ∈ {_iv(iv['alpha'])}  β ∈ {_iv(iv['beta'])}  E ∈ {_iv(iv['E'], '.4g')}")
    a2 = report.approach2
    lines.append(f"approach 2: {len(a2['profiles'])} IsoFLOP budgets, {a2['n_used']} with a bracketed minimum")
    for p in a2["profiles"]:
        where = "inside" if p["bracketed"] else "OUTSIDE the sampled N range (not used)"
        nopt = f"N_opt={p['n_opt']:.3g} ({where})" if math.isfinite(p["n_opt"]) else "no interior minimum (not used)"
        lines.append(f"  C={p['compute']:.3g}: {p['n_points']} points, {nopt}")
    lines.append(f"compute-optimal (C = {report.flops_factor:.3g}·N·D, {report.flops_factor_source}):")
    lines.append(f"  approach 3: N* ∝ C^{j['n_opt_exponent']:.3f} {_iv(iv['a_N_exponent'])}, "
                 f"D* ∝ C^{j['d_opt_exponent']:.3f}")
    lines.append(f"  approach 2: N* ∝ C^{a2['a']:.3f} {_iv(iv['a2_exponent'])}, D* ∝ C^{1 - a2['a']:.3f}")
    for e in report.extrapolation:
        lines.append(f"  {e['name']}: C={e['compute']:.3g}  approach 3: N*={e['n_opt']:.3g} {_iv(e['n_opt_interval'])}"
                     f"  D*={e['d_opt']:.3g} {_iv(e['d_opt_interval'])}  L*={e['loss']:.4g} "
                     f"{_iv(e['loss_interval'], '.4g')}")
        pad = " " * len(f"{e['name']}: C={e['compute']:.3g}")
        lines.append(f"  {pad}  approach 2: "
                     f"N*={e['a2_n_opt']:.3g} {_iv(e['a2_n_opt_interval'])}  D*={e['a2_d_opt']:.3g} "
                     f"{_iv(e['a2_d_opt_interval'])}")
    if report.holdout:
        lines.append("holdout (fitted without these points; approach 3 prediction, 95% prediction interval):")
        for h in report.holdout:
            lines.append(f"  {h['name']}: measured {h['measured']:.4g}  predicted {h['predicted']:.4g} "
                         f"{_iv(h['interval'], '.4g')}  error {100 * h['rel_error']:+.1f}%  "
                         f"{'inside' if h['inside'] else 'OUTSIDE'} the interval")
    if report.warnings:
        lines.append("what these points cannot identify:")
        lines += [f"  - {w}" for w in report.warnings]
    return "\n".join(lines)


def report_json(report) -> str:
    """A report dataclass (ScalingReport, MixtureReport) as JSON; JSON has no NaN, so non-finite floats are null."""
    def clean(v):  # JSON has no NaN
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(asdict(report)), indent=2)


# --------------------------------------------------------------------------------------------------- plot
def _plain_log_labels(ax) -> None:
    """Plain tick labels on log axes. Sweep losses span well under a decade, where matplotlib's default labels its
    minor ticks as '2.1×10⁰'; and on a one-to-two-decade x axis it labels every minor tick, which overlap. Here every
    y tick reads as a plain number and only the 2s and 5s between x decades are labelled."""
    from matplotlib.ticker import FuncFormatter

    def plain(v, _pos):
        return f"{v:.3g}"

    def twos_and_fives(v, _pos):
        if v <= 0:
            return ""
        lead = round(v / 10 ** math.floor(math.log10(v)), 6)
        return f"{v:.3g}" if lead in (2.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.yaxis.set_minor_formatter(FuncFormatter(plain))
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.xaxis.set_minor_formatter(FuncFormatter(twos_and_fives))


def _plot_isoflop(ax, points: Points, fits: dict, report: ScalingReport, cmap) -> None:
    """Approach 2: loss vs N per compute budget with its parabola in log N and the minimum (open if unbracketed)."""
    compute = fits["compute"]
    groups = isoflop_groups(points, compute)
    for i, (g, prof) in enumerate(zip(groups, report.approach2["profiles"])):
        color = cmap(i / max(1, len(groups) - 1))
        ax.scatter(points.n[g], points.loss[g], color=color, zorder=3, label=f"C={prof['compute']:.3g}")
        if len(np.unique(points.n[g])) >= 3:
            coef = np.polyfit(np.log(points.n[g]), np.log(points.loss[g]), 2)
            xs = np.geomspace(points.n[g].min() / 1.3, points.n[g].max() * 1.3, 100)
            ax.plot(xs, np.exp(np.polyval(coef, np.log(xs))), color=color, lw=1)
        if math.isfinite(prof["n_opt"]):
            ax.plot([prof["n_opt"]], [prof["loss_opt"]], "D", color=color, ms=8,
                    mfc=color if prof["bracketed"] else "none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_labels(ax)
    ax.set_xlabel(report.variables["N"])
    ax.set_ylabel("final loss")
    ax.set_title("approach 2: IsoFLOP profiles (◆ minimum; open = outside sampled N)")
    ax.legend(fontsize=7)


def _plot_optimum(ax, fits: dict, report: ScalingReport) -> None:
    """N*(C) of both approaches over the sweep's budgets and the extrapolation, with bootstrap intervals."""
    k = fits["k_flops"]
    prof = [p for p in report.approach2["profiles"] if p["bracketed"]]
    c_lo = min([p["compute"] for p in report.approach2["profiles"]] + [e["compute"] for e in report.extrapolation])
    c_hi = max([p["compute"] for p in report.approach2["profiles"]] + [e["compute"] for e in report.extrapolation])
    cs = np.geomspace(c_lo / 2, c_hi * 2, 100)
    n3, _, _ = compute_optimal(fits["joint"], cs, k)
    n2, _ = approach2_optimum(report.approach2, cs, k)
    n3 = np.where(np.isfinite(n3) & (n3 > 0), n3, np.nan)
    if not (np.isfinite(n3).any() or np.isfinite(n2).any() or prof):
        ax.text(0.5, 0.5, "N*(C) not identified by either approach\n(see the report's warnings)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_title("N*(C): both approaches")
        return
    if np.isfinite(n3).any():
        ax.plot(cs, n3, "r-", label="approach 3 (joint law)")
    if np.isfinite(n2).any():
        ax.plot(cs, n2, "b--", label="approach 2 (IsoFLOP minima)")
    if prof:
        ax.scatter([p["compute"] for p in prof], [p["n_opt"] for p in prof], color="b", zorder=3)
    for e in report.extrapolation:
        for key, color, dx in (("n_opt", "r", 1.0), ("a2_n_opt", "b", 1.15)):
            lo, hi = e[f"{key}_interval"]
            if all(math.isfinite(v) and v > 0 for v in (e[key], lo, hi)):
                ax.errorbar([e["compute"] * dx], [e[key]], yerr=[[max(0.0, e[key] - lo)], [max(0.0, hi - e[key])]],
                            fmt="*", color=color, ms=10, capsize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel(f"compute-optimal {report.variables['N']}")
    ax.set_title("N*(C): both approaches, 95% bootstrap intervals")
    ax.legend(fontsize=7)


def _plot_holdout(ax, report: ScalingReport) -> None:
    """Predicted (with the 95% prediction interval) vs measured loss of the held-out points."""
    if not report.holdout:
        ax.text(0.5, 0.5, "no holdout\n(medfm scaling fit --holdout largest)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    meas = np.array([h["measured"] for h in report.holdout])
    pred = np.array([h["predicted"] for h in report.holdout])
    lo = np.array([h["interval"][0] for h in report.holdout])
    hi = np.array([h["interval"][1] for h in report.holdout])
    inside = np.array([h["inside"] for h in report.holdout])
    yerr = np.nan_to_num(np.stack([np.maximum(0, pred - lo), np.maximum(0, hi - pred)]))
    for sel, color, label in ((inside, "g", "measured inside interval"), (~inside, "r", "measured OUTSIDE")):
        if sel.any():
            ax.errorbar(meas[sel], pred[sel], yerr=yerr[:, sel], fmt="o", color=color, capsize=4, label=label)
    span = [min(meas.min(), np.nanmin(lo)) * 0.98, max(meas.max(), np.nanmax(hi)) * 1.02]
    ax.plot(span, span, "k:", lw=1, label="predicted = measured")
    for h in report.holdout:
        ax.annotate(h["name"], (h["measured"], h["predicted"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    err = np.mean(np.abs(pred / meas - 1)) * 100
    ax.set_xlabel("measured loss (held out)")
    ax.set_ylabel("predicted loss (fit without them)")
    ax.set_title(f"holdout: mean |error| {err:.1f}%, {inside.sum()}/{len(inside)} inside")
    ax.legend(fontsize=7)


def plot_fits(points: Points, fits: dict, report: ScalingReport, out) -> Path:
    """Six panels: loss vs N (one colour per D, joint-law curves, the L(N) envelope law), loss vs D, the compute
    frontier L*(C) with the extrapolated budgets; approach 2's IsoFLOP profiles, N*(C) of both approaches, and the
    holdout check (predicted vs measured with prediction intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out = Path(out)
    joint, k_flops = fits["joint"], fits["k_flops"]
    fig, grid_axes = plt.subplots(2, 3, figsize=(16, 9.6))
    axes = grid_axes[0]
    cmap = plt.get_cmap("viridis")
    for ax, x, other, xname, oname, law in (
        (axes[0], points.n, points.d, report.variables["N"], report.variables["D"], fits["law_n"]),
        (axes[1], points.d, points.n, report.variables["D"], report.variables["N"], fits["law_d"]),
    ):
        levels = np.unique(other)
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        for i, lv in enumerate(levels):
            color = cmap(i / max(1, len(levels) - 1))
            sel = other == lv
            ax.scatter(x[sel], points.loss[sel], color=color, label=f"{oname}={lv:.3g}", zorder=3)
            pred = joint.predict(grid, np.full_like(grid, lv)) if x is points.n else joint.predict(np.full_like(grid, lv), grid)
            ax.plot(grid, pred, color=color, lw=1, alpha=0.8)
        if law is not None:
            ax.plot(grid, law.predict(grid), "k--", lw=1.5,
                    label=f"envelope fit: {law.E:.3g}+{law.coef[0]:.3g}·{xname}^-{law.exponents[0]:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_labels(ax)
        ax.set_xlabel(xname)
        ax.set_ylabel("final loss")
        ax.set_title(f"loss vs {xname} (lines: joint L(N,D))")
        ax.legend(fontsize=7)
    ax = axes[2]
    compute = k_flops * points.n * points.d
    sc = ax.scatter(compute, points.loss, c=np.log10(points.n), cmap="viridis", zorder=3)
    fig.colorbar(sc, ax=ax, label=f"log10 {report.variables['N']}")
    c_hi = max([compute.max()] + [b.flops for b in fits["budgets"]]) * 1.5
    c_grid = np.geomspace(compute.min() / 1.5, c_hi, 200)
    _, _, l_star = compute_optimal(joint, c_grid, k_flops)
    ax.plot(c_grid, l_star, "r-", lw=1.5, label="compute-optimal frontier L*(C)")
    for e in report.extrapolation:
        lo, hi = e["loss_interval"]
        # The point estimate can fall outside its bootstrap percentile interval (a skewed bootstrap); matplotlib
        # rejects negative error-bar lengths, so such a side is drawn as zero.
        yerr = None if not (np.isfinite(lo) and np.isfinite(hi)) else [[max(0.0, e["loss"] - lo)],
                                                                      [max(0.0, hi - e["loss"])]]
        ax.errorbar([e["compute"]], [e["loss"]], yerr=yerr, fmt="r*", ms=12, capsize=4,
                    label=f"{e['name']}: N*={e['n_opt']:.3g}, D*={e['d_opt']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Loss as plain numbers; x keeps matplotlib's 10^k labels, since compute spans several decades.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
    ax.set_xlabel(f"compute C = {k_flops:.3g}·N·D (FLOPs)")
    ax.set_ylabel("final loss")
    ax.set_title("compute frontier and extrapolation")
    ax.legend(fontsize=7)
    _plot_isoflop(grid_axes[1][0], points, fits, report, cmap)
    _plot_optimum(grid_axes[1][1], fits, report)
    _plot_holdout(grid_axes[1][2], report)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
