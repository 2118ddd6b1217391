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


# --------------------------------------------------------------------------------------------------- reading points
@dataclass
class Points:
    """Finished sweep points: model size N, data size D, final loss L (all > 0), plus optional measured FLOPs."""

    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)


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
    n, d, loss, flops, labels = [], [], [], [], []
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
    if len(n) < 6:
        raise ConfigError(f"{path}: {len(n)} finished points; the joint law has 5 parameters, so at least 6 are needed")
    points = Points(np.array(n), np.array(d), np.array(loss), np.array(flops) if has_flops else None, labels)
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
    if alpha <= 0 or beta <= 0:  # a flat direction: no interior optimum
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
    extrapolation: list      # per budget: C, N*, D*, L* with intervals
    variables: dict


def _interval(values, level=0.95):
    values = np.asarray([v for v in values if np.isfinite(v)])
    if len(values) < 2:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def fit_all(points: Points, budgets: list[Budget] | None = None, n_boot: int = 200, seed: int = 0,
            names: tuple[str, str] = ("N", "D"), progress: bool = False) -> tuple[ScalingReport, dict]:
    """Fit the three laws, bootstrap their exponents and extrapolate the compute-optimal frontier to ``budgets``.

    Returns the report (JSON-able) and the fitted LawFit objects (for plotting)."""
    k_flops, k_source = estimate_flops_factor(points)
    env_n = lower_envelope(points.n, points.loss)
    env_d = lower_envelope(points.d, points.loss)
    law_n = fit_law([env_n[0]], env_n[1], (names[0],)) if len(env_n[0]) >= 3 else None
    law_d = fit_law([env_d[0]], env_d[1], (names[1],)) if len(env_d[0]) >= 3 else None
    joint = fit_law([points.n, points.d], points.loss, names)
    if not budgets:
        c_max = float((k_flops * points.n * points.d).max())
        budgets = [Budget("100x-largest-point", 100 * c_max)]
    c_budget = np.array([b.flops for b in budgets])
    n_star, d_star, l_star = compute_optimal(joint, c_budget, k_flops)

    # Bootstrap: resample points with replacement and refit.
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {k: [] for k in ("alpha", "beta", "E", "a_N_exponent", "alpha_N_only", "beta_D_only")}
    star_samples = [[] for _ in budgets]
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
        s = sum(bj.exponents)
        samples["a_N_exponent"].append(bj.exponents[1] / s if s > 0 else float("nan"))
        for law, x, key in ((law_n, points.n, "alpha_N_only"), (law_d, points.d, "beta_D_only")):
            ex, ey = lower_envelope(x[idx], points.loss[idx])
            if law is not None and len(ex) >= 3:
                samples[key].append(fit_law([ex], ey, law.variables, starts=law.theta[None]).exponents[0])
        bn, bd, bl = compute_optimal(bj, c_budget, k_flops)
        for j in range(len(budgets)):
            star_samples[j].append((bn[j], bd[j], bl[j]))

    intervals = {k: _interval(v) for k, v in samples.items()}
    extrapolation = []
    for j, b in enumerate(budgets):
        arr = np.array(star_samples[j]) if star_samples[j] else np.full((0, 3), np.nan)
        extrapolation.append({
            "name": b.name, "compute": b.flops,
            "n_opt": float(n_star[j]), "n_opt_interval": _interval(arr[:, 0]) if len(arr) else [math.nan] * 2,
            "d_opt": float(d_star[j]), "d_opt_interval": _interval(arr[:, 1]) if len(arr) else [math.nan] * 2,
            "loss": float(l_star[j]), "loss_interval": _interval(arr[:, 2]) if len(arr) else [math.nan] * 2,
        })
    s = sum(joint.exponents)
    report = ScalingReport(
        n_points=len(points.n), flops_factor=k_flops, flops_factor_source=k_source,
        law_n=asdict(law_n) if law_n else {}, law_d=asdict(law_d) if law_d else {},
        joint={**asdict(joint), "n_opt_exponent": joint.exponents[1] / s if s > 0 else math.nan,
               "d_opt_exponent": joint.exponents[0] / s if s > 0 else math.nan},
        intervals=intervals, bootstrap=len(samples["alpha"]), extrapolation=extrapolation,
        variables={"N": names[0], "D": names[1]},
    )
    return report, {"law_n": law_n, "law_d": law_d, "joint": joint, "k_flops": k_flops, "budgets": budgets}


def format_report(report: ScalingReport) -> str:
    """Human-readable summary printed by ``medfm scaling fit``."""
    iv = report.intervals
    j = report.joint
    lines = [f"{report.n_points} points, {report.bootstrap} bootstrap refits, 95% percentile intervals"]
    if report.law_n:
        ln = report.law_n
        lines.append(f"L(N)   = {ln['E']:.4g} + {ln['coef'][0]:.4g}·N^-{ln['exponents'][0]:.3f}"
                     f"   α ∈ [{iv['alpha_N_only'][0]:.3f}, {iv['alpha_N_only'][1]:.3f}]   rmse(log) {ln['rmse_log']:.4f}")
    if report.law_d:
        ld = report.law_d
        lines.append(f"L(D)   = {ld['E']:.4g} + {ld['coef'][0]:.4g}·D^-{ld['exponents'][0]:.3f}"
                     f"   β ∈ [{iv['beta_D_only'][0]:.3f}, {iv['beta_D_only'][1]:.3f}]   rmse(log) {ld['rmse_log']:.4f}")
    lines.append(f"L(N,D) = {j['E']:.4g} + {j['coef'][0]:.4g}/N^{j['exponents'][0]:.3f} + "
                 f"{j['coef'][1]:.4g}/D^{j['exponents'][1]:.3f}   rmse(log) {j['rmse_log']:.4f}")
    lines.append(f"         α ∈ [{iv['alpha'][0]:.3f}, {iv['alpha'][1]:.3f}]  β ∈ [{iv['beta'][0]:.3f}, "
                 f"{iv['beta'][1]:.3f}]  E ∈ [{iv['E'][0]:.4g}, {iv['E'][1]:.4g}]")
    lines.append(f"compute-optimal (C = {report.flops_factor:.3g}·N·D, {report.flops_factor_source}): "
                 f"N* ∝ C^{j['n_opt_exponent']:.3f} [{iv['a_N_exponent'][0]:.3f}, {iv['a_N_exponent'][1]:.3f}], "
                 f"D* ∝ C^{j['d_opt_exponent']:.3f}")
    for e in report.extrapolation:
        lines.append(f"  {e['name']}: C={e['compute']:.3g}  N*={e['n_opt']:.3g} [{e['n_opt_interval'][0]:.3g}, "
                     f"{e['n_opt_interval'][1]:.3g}]  D*={e['d_opt']:.3g} [{e['d_opt_interval'][0]:.3g}, "
                     f"{e['d_opt_interval'][1]:.3g}]  L*={e['loss']:.4g} [{e['loss_interval'][0]:.4g}, "
                     f"{e['loss_interval'][1]:.4g}]")
    return "\n".join(lines)


def report_json(report: ScalingReport) -> str:
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


def plot_fits(points: Points, fits: dict, report: ScalingReport, out) -> Path:
    """Three panels: loss vs N (one colour per D, joint-law curves, the L(N) envelope law), loss vs D, and the
    compute frontier L*(C) with the extrapolated budgets and their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out = Path(out)
    joint, k_flops = fits["joint"], fits["k_flops"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
