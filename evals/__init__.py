"""medfm.evals: frozen-feature evaluation of medfm models with clinical metrics and patient-level 95% CIs.

    from medfm.evals import load_model, load_suite, run_suite, write_report   # `medfm eval` in code
    from medfm.evals.metrics import auroc, auprc, cohen_kappa, concordance_index, sensitivity_at_specificity
    from medfm.evals.bootstrap import bootstrap_ci
    medfm.evals.hook:periodic_eval                                               # pretrain eval.hook

Heavy dependencies (torch, accelerate, lifelines, matplotlib, mlflow) are imported where used.
"""

from medfm.evals.bootstrap import Estimate, bootstrap_ci
from medfm.evals.metrics import MetricError


def load_model(source):
    """(model, weights sha256, kind) from a checkpoint dir, a consolidated .safetensors or a release."""
    from medfm.evals.features import load_model as _load

    return _load(source)


def load_suite(path, overrides=()):
    from medfm.evals.suite import load_suite as _load

    return _load(path, overrides)


def run_suite(suite, model, model_hash, out_dir=None, accelerator=None, progress=True):
    from medfm.evals.suite import run_suite as _run

    return _run(suite, model, model_hash, out_dir, accelerator, progress)


def write_report(results, out_dir, suite_name, model_info, mlflow_run=None):
    from medfm.evals.report import write_report as _write

    return _write(results, out_dir, suite_name, model_info, mlflow_run)


__all__ = ["Estimate", "MetricError", "bootstrap_ci", "load_model", "load_suite", "run_suite",
           "write_report"]
