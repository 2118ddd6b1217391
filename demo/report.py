"""Stage 5: ``<out>/report/REPORT.md`` with the loss curves, MAE figures, the pretrained-vs-random table and verdict
(verdict.py), the comparison plot and ``comparison.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medfm.demo.verdict import compare, headline, verdict_lines

DEMO_NAME = "medfm-demo"
DEMO_VERSION = "0.1.0"


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""


def _show_ci(row: dict, who: str) -> str:
    if row.get(f"{who}_unstable"):
        return f"unstable ({row[f'{who}_unstable']} valid resamples)"
    return _ci(row.get(f"{who}_ci")) or "—"


def comparison_plot(rows: list[dict], path: Path) -> Path | None:
    """Linear-probe AUROC per task (with 95% CIs) and few-shot AUROC vs k, pretrained vs random init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = [r for r in rows if r["task"].endswith("_logistic") and r["metric"] == "auroc"]
    few: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["task"].endswith("_fewshot") and r["metric"].startswith("auroc (shots="):
            few.setdefault(r["task"], {})[int(r["metric"].split("=")[1].rstrip(")"))] = r
    if not probe and not few:
        return None
    fig, axes = plt.subplots(1, 1 + len(few), figsize=(4.5 * (1 + len(few)), 3.6), squeeze=False)
    ax = axes[0][0]
    for j, (key, color) in enumerate((("pretrained", "tab:blue"), ("random_init", "tab:gray"))):
        xs = [i + (j - 0.5) * 0.35 for i in range(len(probe))]
        vals = [r[key] for r in probe]
        err = [[max(0.0, r[key] - (r[f"{key}_ci"] or [r[key]])[0]) for r in probe],
               [max(0.0, (r[f"{key}_ci"] or [0, r[key]])[1] - r[key]) for r in probe]]
        ax.bar(xs, vals, width=0.35, color=color, yerr=err, capsize=3, label=key.replace("_", " "))
    ax.set_xticks(range(len(probe)), [r["task"].removesuffix("_logistic") for r in probe], rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test AUROC (95% CI)")
    ax.set_title("linear probe")
    ax.legend(fontsize=8)
    for ax, (task, by_k) in zip(axes[0][1:], few.items()):
        ks = sorted(by_k)
        for key, color in (("pretrained", "tab:blue"), ("random_init", "tab:gray")):
            ax.errorbar(ks, [by_k[k][key] for k in ks], fmt="o-", color=color, capsize=3,
                        yerr=[[max(0.0, by_k[k][key] - (by_k[k][f"{key}_ci"] or [by_k[k][key]])[0]) for k in ks],
                              [max(0.0, (by_k[k][f"{key}_ci"] or [0, by_k[k][key]])[1] - by_k[k][key]) for k in ks]],
                        label=key.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("labelled examples per class")
        ax.set_title(task.removesuffix("_fewshot") + ": few-shot AUROC")
        ax.set_ylim(0.3, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_report(out: Path, corpus: dict, run_dir: Path, pre: Path, rnd: Path, release_dir: Path,
                 seconds: float) -> Path:
    rep_dir = out / "report"
    rep_dir.mkdir(parents=True, exist_ok=True)
    curve = run_dir / "loss_curve.png"
    if curve.is_file():
        shutil.copy(curve, rep_dir / "loss_curve.png")
    rows = compare(pre, rnd)
    head = headline(rows)
    plot = comparison_plot(rows, rep_dir / "pretrained_vs_random.png")
    lines = ["# medfm demo report", "",
             f"Finished in {seconds / 60:.1f} min. Everything below was computed in this run from the files "
             "listed; the corpus's labels and captions are derived from atlases, metadata and beat detection, "
             "not from clinicians (see README, 'The demo data').", "",
             "## Data", "", "| dataset | samples | splits |", "|---|---|---|"]
    for name, c in corpus["counts"].items():
        lines.append(f"| {name} | {c['samples']} | {', '.join(f'{k} {v}' for k, v in c['splits'].items())} |")
    lines += ["", "Contact sheet of the genuine real files: ![contact sheet](contact_sheet.png)", "",
              "## Pretraining", "", f"Run directory `{run_dir}` (resolved config, checkpoints, mlflow.db, "
              "metrics.jsonl, per-rank logs).", "", "![loss curves](loss_curve.png)", ""]
    if not any(run_dir.glob("mae_*.png")):  # a reused run trained before the figure existed: draw it from the release
        from medfm.model_zoo import load
        from medfm.pretrain.config import load_run_config
        from medfm.pretrain.mae_figure import write_mae_figures

        write_mae_figures(load(release_dir), load_run_config(out / "pretrain.yaml"), run_dir)
    for png in sorted(run_dir.glob("mae_*.png")):  # written at the end of pretraining (pretrain/mae_figure.py)
        shutil.copy(png, rep_dir / png.name)
        lines += [f"MAE {png.stem.removeprefix('mae_')} (input / masked / reconstruction): ![{png.stem}]({png.name})",
                  ""]
    lines += ["## Pretrained encoder vs the same architecture at random init", ""]
    lines += verdict_lines(head)
    lines += ["", "Zero-shot and retrieval at random init use the same byte tokenizer as the pretrained model (the "
                  "release carries it), so their rows are what an untrained text tower really scores. Retrieval "
                  "treats identical captions as one positive set and averages ties; its chance level is in the "
                  "table. Read the n (patients) column: the ECG test split holds ~5 pseudo-patients, so many of its "
                  "intervals are wide or unstable."]
    if plot is not None:
        lines += ["", "![pretrained vs random init](pretrained_vs_random.png)"]
    lines += ["", "| task | metric | pretrained | 95% CI | random init | 95% CI | n (patients) | chance |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chance = f"{r['chance']:.3f}" if isinstance(r.get("chance"), (int, float)) else ""
        lines.append(f"| {r['task']} | {r['metric']} | {r['pretrained']:.3f} | {_show_ci(r, 'pretrained')} | "
                     f"{r['random_init']:.3f} | {_show_ci(r, 'random_init')} | {r['n']} ({r.get('n_patients', '?')}) "
                     f"| {chance} |")
    lines += ["", f"Per-task ROC/PR curves: `{pre.parent}` (pretrained) and `{rnd.parent}` (random init).", "",
              "## Release", "", f"`{release_dir}` — load it with `medfm.model_zoo.load(\"{DEMO_NAME}:{DEMO_VERSION}\", "
              f"zoo=\"{release_dir.parent.parent}\")`; its README.md is the model card.", ""]
    path = rep_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    (rep_dir / "comparison.json").write_text(json.dumps({"headline": head, "rows": rows}, indent=2))
    for png in pre.parent.glob("*.png"):
        shutil.copy(png, rep_dir / f"pretrained_{png.name}")
    return path
