"""Periodic evaluation during pretraining: ``eval: {every: N, hook: "medfm.evals.hook:periodic_eval"}`` in the
run config makes the training loop call ``periodic_eval(model, step, run_dir)`` on every rank every N steps.

Cheap by design: each task is capped to ``MEDFM_EVAL_MAX_SAMPLES`` samples per split (default 256), no bootstrap,
no feature cache (the weights change every call). Rank-aware: every rank runs the same feature-extraction batches
(accelerate pads the last one), which ZeRO-3 needs because each forward gathers partitioned parameters collectively;
only rank 0 fits the probes and writes ``<run_dir>/evals/step<N>/report.json``. The suite comes from
``MEDFM_EVAL_SUITE`` or ``<run_dir>/eval_suite.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

from medfm.schema import ConfigError


def suite_path(run_dir) -> Path:
    env = os.environ.get("MEDFM_EVAL_SUITE")
    path = Path(env) if env else Path(run_dir) / "eval_suite.yaml"
    if not path.is_file():
        raise ConfigError(f"periodic eval: suite {path} not found (set MEDFM_EVAL_SUITE or write "
                          f"{Path(run_dir) / 'eval_suite.yaml'})")
    return path


def record_tokenizer(model, run_dir) -> None:
    """Give the live model the tokenizer spec training uses (from the run's resolved config.yaml), as a loaded
    checkpoint or release carries it, so zero-shot prompts are tokenised as the training text was."""
    if "text" not in model.towers or getattr(model, "text_tokenizer_spec", None) is not None:
        return
    import yaml

    from medfm.model_zoo.tokenizers import spec_from_run_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"periodic eval: {path} not found (the run config that names train.tokenizer)")
    model.text_tokenizer_spec = spec_from_run_config(model.towers["text"], yaml.safe_load(path.read_text()) or {})


def periodic_eval(model, step: int, run_dir) -> dict | None:
    """Run the suite on a subset; returns {"task/metric": value} on rank 0 (None elsewhere)."""
    from medfm.evals.features import get_accelerator
    from medfm.evals.report import write_report
    from medfm.evals.suite import load_suite, run_suite

    max_samples = int(os.environ.get("MEDFM_EVAL_MAX_SAMPLES", "256"))
    suite = load_suite(suite_path(run_dir), ["n_boot=0"])
    suite.cache_dir = ""  # with out_dir=None below: no cache (the weights change every call)
    for task in suite.tasks:
        task.max_samples = task.max_samples or max_samples
    record_tokenizer(model, run_dir)
    accelerator = get_accelerator()
    was_training = model.training
    model.eval()
    try:
        results = run_suite(suite, model, f"step{step}", None, accelerator, progress=False)
    finally:
        model.train(was_training)
    if not accelerator.is_main_process:
        return None
    out = Path(run_dir) / "evals" / f"step{step}"
    report = write_report(results, out, suite.name, {"source": str(run_dir), "kind": "training", "step": step})
    return {f"{r['task']}/{r['metric']}": r["value"] for r in report["results"] if r["value"] is not None
            and not r["params"]}
