"""Data-mixture fits for sweeps with a mixture axis (``medfm scaling mixture RESULTS.csv ...``).

Functional form. For each modality m with a single-modality objective (``mae:image``, ``mae:signal``, ...) the
held-out loss of that objective is a power law in the number of training samples that carried the modality::

    L_m(D_m) = E_m + B_m · D_m^(-β_m),      D_m = s_m · D

where D is the point's training samples and s_m its share of samples carrying m (``share/<m>`` in results.csv: the
sum of the normalised weights of the sources that hold m, plan policy "all"). Each law is fitted like the scaling
laws (launch/scaling.py: Huber in log space, L-BFGS from grid starts) on every finished point of one model size.
Cross-modal transfer (image training lowering the signal loss) is outside this form; the fit's residuals show it.

Recommendation. For a target budget of D samples the recommended mixture minimises the (objective-weighted) sum of
the predicted held-out losses, ``Σ_m w_m · L_m(s_m(x) · D)``, over the source weights x on the simplex (s_m(x) =
the share of samples carrying m under source shares x). Intervals: a bootstrap over points (refit every modality's
law, re-minimise). When a modality's exponent reaches the fit's bound or its E → 0, the report says the data cannot
identify it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.launch.scaling import EXPONENT_BOUND, LawFit, _interval, fit_law, report_json
from medfm.schema import ConfigError


@dataclass
class MixturePoints:
    """Finished points of one model size: training samples D, source shares, modality shares, held-out losses."""

    samples: np.ndarray                     # [P]
    sources: list[str]                      # source names
    source_share: np.ndarray                # [P, S]
    modalities: list[str]                   # modalities with a single-modality objective
    modality_share: np.ndarray              # [P, M]
    loss: np.ndarray                        # [P, M] held-out loss of each modality's objective
    objective: list[str]                    # the objective per modality
    membership: np.ndarray                  # [S, M]: 1 where source s carries modality m (inferred from shares)
    labels: list[str] = field(default_factory=list)


def _float(row, col, path, line):
    text = (row.get(col) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{path}: line {line}, column '{col}': expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{path}: line {line}, column '{col}': expected a finite number >= 0, got {text!r}")
    return value


def read_mixture_points(paths, size: str | None = None) -> MixturePoints:
    """Rows with status ``done`` (and ``size`` when given) from one or more results CSVs of ``medfm sweep``."""
    rows, header = [], None
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"{path}: results file not found")
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            for i, row in enumerate(reader, start=2):
                if row.get("status", "done") == "done" and (size is None or row.get("size") == size):
                    rows.append((path, i, row))
        header = cols if header is None else [c for c in header if c in cols]
    if not rows:
        raise ConfigError(f"{', '.join(map(str, paths))}: no finished points" + (f" of size {size!r}" if size else ""))
    objectives = [c.removeprefix("eval_loss/") for c in header if c.startswith("eval_loss/")]
    single = {o.partition(":")[2]: o for o in objectives if "-" not in o.partition(":")[2]}
    modalities = [m for m in single if f"share/{m}" in header]
    if not modalities:
        raise ConfigError(f"{paths[0]}: no single-modality held-out losses with a share column (expected "
                          "'eval_loss/mae:<m>' and 'share/<m>'; run the sweep with two or more weighted sources)")
    from medfm.shards.manifest import MODALITIES

    sources = [c.removeprefix("share/") for c in header if c.startswith("share/")
               and c.removeprefix("share/") not in MODALITIES]
    if len(sources) < 2:
        raise ConfigError(f"{paths[0]}: fewer than 2 source share columns ('share/<source>'): nothing to mix")
    d = np.array([_float(r, "samples", p, i) for p, i, r in rows])
    xs = np.array([[_float(r, f"share/{s}", p, i) for s in sources] for p, i, r in rows])
    ms = np.array([[_float(r, f"share/{m}", p, i) for m in modalities] for p, i, r in rows])
    loss = np.array([[_float(r, f"eval_loss/{single[m]}", p, i) for m in modalities] for p, i, r in rows])
    if np.linalg.matrix_rank(xs) < len(sources):
        raise ConfigError(f"{paths[0]}: the finished points have fewer distinct mixtures than sources "
                          f"({len(sources)}): nothing to fit a mixture law on")
    # Which source carries which modality: the modality share is the sum of its sources' shares.
    sol, *_ = np.linalg.lstsq(xs, ms, rcond=None)
    membership = (sol > 0.5).astype(float)
    labels = [r.get("name") or f"line{i}" for _, i, r in rows]
    return MixturePoints(d, sources, xs, modalities, ms, loss, [single[m] for m in modalities], membership, labels)


def _fit_modality(pts: MixturePoints, j: int, idx=None, start: LawFit | None = None) -> LawFit | None:
    idx = np.arange(len(pts.samples)) if idx is None else idx
    dm = pts.samples[idx] * pts.modality_share[idx, j]
    ok = dm > 0
    if len(np.unique(dm[ok])) < 3:
        return None
    return fit_law([dm[ok]], pts.loss[idx, j][ok], (f"D_{pts.modalities[j]}",),
                   starts=None if start is None else start.theta[None])


def _simplex(k: int, n: int = 20001, seed: int = 0) -> np.ndarray:
    """Candidate source shares: a fine grid for 2 sources, Dirichlet draws beyond."""
    if k == 2:
        s = np.linspace(0.0, 1.0, n)
        return np.stack([s, 1 - s], axis=1)
    return np.random.default_rng(seed).dirichlet(np.ones(k), n)


def recommend(pts: MixturePoints, laws: list[LawFit], target: float, weights=None, candidates=None):
    """Source shares minimising Σ_m w_m·L_m(s_m·D) at D = target -> (shares [S], modality shares [M], losses [M])."""
    cand = _simplex(len(pts.sources)) if candidates is None else candidates
    w = np.ones(len(laws)) if weights is None else np.asarray(weights)
    mshare = cand @ pts.membership  # [C, M]
    total = np.zeros(len(cand))
    per = []
    for j, law in enumerate(laws):
        dm = np.maximum(mshare[:, j] * target, 1e-12)
        lm = law.predict(dm)
        per.append(lm)
        total += w[j] * lm
    best = int(np.argmin(total))
    return cand[best], mshare[best], np.array([p[best] for p in per])


@dataclass
class MixtureReport:
    n_points: int
    sources: list
    modalities: list
    laws: dict                # modality -> {E, B, beta, rmse_log, intervals}
    target_samples: float
    recommended: dict         # source -> share, with intervals; modality shares; predicted losses
    bootstrap: int
    warnings: list


def fit_mixture(pts: MixturePoints, target: float, n_boot: int = 200, seed: int = 0) -> tuple[MixtureReport, list]:
    laws = [_fit_modality(pts, j) for j in range(len(pts.modalities))]
    missing = [m for m, law in zip(pts.modalities, laws) if law is None]
    if missing:
        raise ConfigError(f"modality {missing[0]!r}: fewer than 3 distinct sample counts D_m = share x samples among "
                          "the finished points; the 3-parameter law needs more budgets or mixtures")
    cand = _simplex(len(pts.sources))
    shares, mshares, losses = recommend(pts, laws, target, candidates=cand)
    rng = np.random.default_rng(seed)
    boot = {"beta": [[] for _ in laws], "E": [[] for _ in laws], "shares": [], "losses": []}
    for _ in range(n_boot):
        idx = rng.integers(0, len(pts.samples), len(pts.samples))
        blaws = [_fit_modality(pts, j, idx, laws[j]) for j in range(len(laws))]
        if any(b is None for b in blaws):
            continue
        for j, b in enumerate(blaws):
            boot["beta"][j].append(b.exponents[0])
            boot["E"][j].append(b.E)
        s, _, lo = recommend(pts, blaws, target, candidates=cand)
        boot["shares"].append(s)
        boot["losses"].append(lo)
    bs = np.array(boot["shares"]) if boot["shares"] else np.full((0, len(pts.sources)), np.nan)
    bl = np.array(boot["losses"]) if boot["losses"] else np.full((0, len(laws)), np.nan)
    law_out, warnings = {}, []
    for j, (m, law) in enumerate(zip(pts.modalities, laws)):
        beta_iv, e_iv = _interval(boot["beta"][j]), _interval(boot["E"][j])
        law_out[m] = {"objective": pts.objective[j], "E": law.E, "B": law.coef[0], "beta": law.exponents[0],
                      "rmse_log": law.rmse_log, "beta_interval": beta_iv, "E_interval": e_iv}
        b = law.exponents[0]
        if b <= 1e-3 or b >= EXPONENT_BOUND - 1e-3 or not all(map(math.isfinite, beta_iv)) \
                or beta_iv[0] <= 1e-3 or beta_iv[1] >= EXPONENT_BOUND - 1e-3:
            warnings.append(f"{m}: the exponent β={b:.3g} (interval [{beta_iv[0]:.3g}, {beta_iv[1]:.3g}]) reaches "
                            f"the fit's bound (0 or {EXPONENT_BOUND:g}): these points do not identify it")
        elif beta_iv[1] - beta_iv[0] > max(0.5, abs(b)):
            warnings.append(f"{m}: the exponent β={b:.3g} is poorly identified (interval [{beta_iv[0]:.3g}, "
                            f"{beta_iv[1]:.3g}] is wider than the estimate)")
        if law.E < 1e-3 * float(pts.loss[:, j].min()):
            warnings.append(f"{m}: E → {law.E:.3g}: the held-out loss does not flatten within these budgets, so the "
                            "floor is not identified")
    rec = {"sources": {s: float(x) for s, x in zip(pts.sources, shares)},
           "source_intervals": {s: _interval(bs[:, i]) for i, s in enumerate(pts.sources)},
           "modality_shares": {m: float(x) for m, x in zip(pts.modalities, mshares)},
           "predicted_loss": {m: float(x) for m, x in zip(pts.modalities, losses)},
           "predicted_loss_intervals": {m: _interval(bl[:, j]) for j, m in enumerate(pts.modalities)}}
    wide = [s for s, (lo, hi) in rec["source_intervals"].items() if math.isfinite(lo) and hi - lo > 0.5]
    if wide:
        warnings.append(f"the recommended share of {', '.join(wide)} has an interval wider than 0.5 of the simplex: "
                        "these points do not pin the mixture down")
    edge = [s for s, x in rec["sources"].items() if x <= 0.005 or x >= 0.995]
    if edge:
        warnings.append(f"the recommended mixture lies at the edge of the simplex ({', '.join(edge)}): the fitted "
                        "laws favour one source outright, outside the shares the sweep measured")
    report = MixtureReport(len(pts.samples), pts.sources, pts.modalities, law_out, float(target), rec,
                           len(boot["shares"]), warnings)
    return report, laws


def _iv(pair, fmt=".3g") -> str:
    lo, hi = pair
    return f"[{lo:{fmt}}, {hi:{fmt}}]" if math.isfinite(lo) and math.isfinite(hi) else "[not identified]"


def format_mixture(report: MixtureReport) -> str:
    lines = [f"{report.n_points} points, {report.bootstrap} bootstrap refits, 95% percentile intervals; "
             "L_m = E_m + B_m·D_m^-β_m, D_m = samples carrying m"]
    for m, law in report.laws.items():
        lines.append(f"  {m} ({law['objective']}): L = {law['E']:.4g} + {law['B']:.4g}·D_{m}^-{law['beta']:.3f}   "
                     f"β ∈ {_iv(law['beta_interval'])}  E ∈ {_iv(law['E_interval'], '.4g')}  "
                     f"rmse(log) {law['rmse_log']:.4f}")
    rec = report.recommended
    lines.append(f"recommended mixture at D = {report.target_samples:.4g} samples (minimum of Σ_m L_m):")
    for s, x in rec["sources"].items():
        lines.append(f"  {s}: share {x:.3f} {_iv(rec['source_intervals'][s])}")
    for m, x in rec["predicted_loss"].items():
        lines.append(f"  predicted held-out {m} loss {x:.4g} {_iv(rec['predicted_loss_intervals'][m], '.4g')} "
                     f"(share of samples carrying {m}: {rec['modality_shares'][m]:.3f})")
    if report.warnings:
        lines.append("what these points cannot identify:")
        lines += [f"  - {w}" for w in report.warnings]
    return "\n".join(lines)


def mixture_json(report: MixtureReport) -> str:
    """The report as JSON (NaN as null), written by the same function as the scaling fit's report."""
    return report_json(report)


def plot_mixture(pts: MixturePoints, laws: list[LawFit], report: MixtureReport, out) -> Path:
    """One panel per modality: held-out loss vs D_m with the fitted law; the last panel: predicted losses at the
    target budget across the first source's share, with the recommendation and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(pts.modalities)
    fig, axes = plt.subplots(1, k + 1, figsize=(5 * (k + 1), 4.5))
    for j, (ax, m, law) in enumerate(zip(axes, pts.modalities, laws)):
        dm = pts.samples * pts.modality_share[:, j]
        sc = ax.scatter(dm, pts.loss[:, j], c=pts.modality_share[:, j], cmap="viridis", zorder=3, vmin=0, vmax=1)
        grid = np.geomspace(max(dm[dm > 0].min() / 1.5, 1e-9), max(dm.max(), report.target_samples) * 1.5, 100)
        ax.plot(grid, law.predict(grid), "k-", lw=1,
                label=f"{law.E:.3g}+{law.coef[0]:.3g}·D^-{law.exponents[0]:.3f}")
        fig.colorbar(sc, ax=ax, label=f"share of samples with {m}")
        ax.set_xscale("log")
        ax.set_xlabel(f"training samples carrying {m} (D_{m})")
        ax.set_ylabel(f"held-out {pts.objective[j]} loss")
        ax.set_title(f"{m}: held-out loss vs its samples")
        ax.legend(fontsize=7)
    ax = axes[-1]
    cand = _simplex(len(pts.sources), 201)
    cand = cand[(cand.min(axis=1) >= 0.02)]  # a share of 0 predicts an unbounded loss: keep the axis readable
    if len(pts.sources) > 2:
        cand = cand[np.argsort(cand[:, 0])]
    mshare = cand @ pts.membership
    total = np.zeros(len(cand))
    for j, (m, law) in enumerate(zip(pts.modalities, laws)):
        lm = law.predict(np.maximum(mshare[:, j] * report.target_samples, 1e-12))
        total += lm
        ax.plot(cand[:, 0], lm, lw=1, label=f"predicted {m}")
    ax.plot(cand[:, 0], total, "k-", lw=1.5, label="sum (minimised)")
    s0 = pts.sources[0]
    x = report.recommended["sources"][s0]
    lo, hi = report.recommended["source_intervals"][s0]
    ax.axvline(x, color="r", label=f"recommended {s0} share {x:.2f}")
    if math.isfinite(lo) and math.isfinite(hi):
        ax.axvspan(lo, hi, color="r", alpha=0.15, label="95% bootstrap interval")
    ax.set_xlabel(f"share of source {s0}")
    ax.set_ylabel("predicted held-out loss")
    ax.set_title(f"mixture at D = {report.target_samples:.3g} samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
