"""The run's report: one JSON (what a model_zoo release card reads), a Markdown table, ROC/PR curves as PNGs, and
optional mlflow logging.

JSON layout (``report.json``)::

    {"schema": 1, "suite": name, "model": {"source", "kind", "weights_sha256"}, "created": ISO time,
     "results": [{"task", "protocol", "kind", "modality", "metric", "value", "ci": [lo, hi], "n", "n_patients",
                  "n_valid_resamples", "n_resamples", "unstable", "params": {...}}],
                                                           # one row per metric (undefined ones carry "error");
                                                           # unstable: too few valid resamples, ci [null, null]
     "tasks": [{"task", "protocol", "status": "ok|failed", "error", "seconds", "info"}]}
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import numpy as np

from medfm.evals.bootstrap import MIN_VALID_SHARE, Estimate
from medfm.schema.atomic import atomic_write

REPORT_SCHEMA = 1


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    if isinstance(obj, float):
        return _finite(obj)
    return obj if isinstance(obj, (str, int, bool)) or obj is None else str(obj)


def build_report(results, suite_name: str, model_info: dict) -> dict:
    rows, tasks = [], []
    for r in results:
        tasks.append({"task": r.task, "protocol": r.protocol, "status": r.status, "error": r.error,
                      "seconds": round(r.seconds, 3), "info": _jsonable(r.info)})
        for row in r.rows:
            base = {"task": r.task, "protocol": r.protocol, "kind": r.kind, "modality": r.modality,
                    "metric": row.metric, "params": _jsonable(row.params)}
            if isinstance(row.estimate, Estimate):
                e = row.estimate
                base.update(value=_finite(e.value), ci=[_finite(e.low), _finite(e.high)], n=e.n, n_patients=e.n_groups,
                            n_valid_resamples=e.n_boot, n_resamples=e.n_resamples, unstable=e.unstable)
            else:
                base.update(value=None, ci=[None, None], n=None, n_patients=None, error=str(row.estimate))
            rows.append(base)
    return {"schema": REPORT_SCHEMA, "suite": suite_name, "model": _jsonable(model_info),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "results": rows,
            "tasks": tasks}


def format_ci(row: dict) -> str:
    """A report row's interval as printed everywhere (report.md, the demo report, release cards)."""
    if row.get("unstable"):
        return f"unstable ({row.get('n_valid_resamples')}/{row.get('n_resamples')} valid resamples)"
    lo, hi = row.get("ci") or (None, None)
    return f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "—"


def markdown_table(report: dict) -> str:
    """One line per metric: value with its 95% CI; failed tasks listed with their reason."""
    lines = [f"# Evaluation: {report['suite']}", "",
             f"Model: `{report['model'].get('source', '?')}` ({report['model'].get('kind', '?')}, weights "
             f"sha256 {str(report['model'].get('weights_sha256', ''))[:12]})", "",
             "95% CIs: patient-level bootstrap of the test set (few-shot: draws nested inside), clipped to the "
             f"metric's range; 'unstable' = fewer than {MIN_VALID_SHARE:.0%} of the resamples had the metric defined.",
             "",
             "| task | protocol | metric | value | 95% CI | n (patients) |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "repeats")
        metric = f"{r['metric']} ({params})" if params else r["metric"]
        if r["value"] is None:
            lines.append(f"| {r['task']} | {r['protocol']} | {metric} | n/a | {r.get('error', '')} | |")
            continue
        ci = format_ci(r)
        lines.append(f"| {r['task']} | {r['protocol']} | {metric} | {r['value']:.3f} | {ci} | {r['n']} "
                     f"({r['n_patients']}) |")
    failed = [t for t in report["tasks"] if t["status"] != "ok"]
    if failed:
        lines += ["", "## Failed tasks", ""] + [f"- **{t['task']}** ({t['protocol']}): {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"


def plot_curves(results, out_dir) -> list[Path]:
    """ROC and PR curves (one PNG each per binary or per-class task) for tasks that produced class scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfm.evals import metrics as M

    written = []
    out_dir = Path(out_dir)
    for r in results:
        pred = r.predictions
        if pred is None or pred.kind == "survival":
            continue
        if pred.kind == "binary":
            curves = [("positive", pred.y_true, pred.scores)]
        else:
            t, s = M._one_vs_rest(pred.y_true, pred.scores)
            names = pred.class_names or [str(j) for j in range(s.shape[1])]
            curves = [(names[j], t[:, j], s[:, j]) for j in range(s.shape[1])]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
        for name, y, s in curves:
            try:
                fpr, tpr, _ = M.roc_curve(y, s)
                prec, rec = M.precision_recall_curve(y, s)
            except M.MetricError:
                continue  # a class absent from the test split has no curve
            ax1.plot(fpr, tpr, label=f"{name} (AUROC {M.auroc(y, s):.3f})")
            ax2.step(np.r_[0, rec], np.r_[1, prec], where="post", label=f"{name} (AP {M.auprc(y, s):.3f})")
        ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax1.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{r.task}: ROC")
        ax2.set(xlabel="recall", ylabel="precision", title=f"{r.task}: PR", ylim=(0, 1.02))
        for ax in (ax1, ax2):
            ax.legend(fontsize=7, loc="lower right" if ax is ax1 else "lower left")
        fig.tight_layout()
        path = out_dir / f"{r.task}_roc_pr.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results, out_dir, suite_name: str, model_info: dict, mlflow_run: str | None = None) -> dict:
    """Write report.json, report.md and curve PNGs to ``out_dir`` (atomically per file); log to mlflow if asked."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results, suite_name, model_info)
    for name, text in (("report.json", json.dumps(report, indent=2, allow_nan=False)),
                       ("report.md", markdown_table(report))):
        atomic_write(out / name, text)
    pngs = plot_curves(results, out)
    if mlflow_run:
        log_mlflow(report, mlflow_run, [out / "report.json", out / "report.md", *pngs])
    return report


def log_mlflow(report: dict, run_id: str, artifacts=()) -> None:
    """Log every defined metric (``eval/<task>/<metric>[/<params>]``, CI bounds alongside) to an existing run.

    The tracking URI comes from MLFLOW_TRACKING_URI as everywhere else in medfm; mlflow is imported only here.
    """
    import mlflow

    metrics = {}
    for r in report["results"]:
        if r["value"] is None:
            continue
        suffix = "".join(f"/{k}{v}" for k, v in r["params"].items() if k != "repeats")
        name = f"eval/{r['task']}/{r['metric']}{suffix}".replace("@", "_at_").replace("->", "_to_")
        metrics[name] = r["value"]
        if r["ci"][0] is not None:
            metrics[name + "/ci_low"], metrics[name + "/ci_high"] = r["ci"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        for a in artifacts:
            mlflow.log_artifact(str(a), artifact_path="eval")
