"""``medfm eval CHECKPOINT|RELEASE --suite SUITE.yaml [--out DIR]``: one process, or every process of an
``accelerate launch`` / torchrun world (features are extracted across processes; the main one fits and reports).

Exit codes: 0 every task ran, 1 some task failed (the report says which and why), 2 bad usage or config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medfm.schema import ConfigError


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint, state dict or release on an eval suite",
                              description=__doc__)
    p.add_argument("source", metavar="CHECKPOINT|RELEASE",
                   help="checkpoints dir / stepN dir, consolidated .safetensors, or a release dir / zoo name")
    p.add_argument("--suite", required=True, help="eval suite YAML (see configs/evals/)")
    p.add_argument("--out", default=None, help="report directory (default runs/eval/<suite name>)")
    p.add_argument("--cache", default=None, help="feature cache directory (default <out>/features)")
    p.add_argument("--mlflow-run", default=None, help="log metrics and the report into this existing mlflow run id")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="suite overrides, e.g. n_boot=200")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from medfm.evals.features import ModelSourceError, get_accelerator, load_model
    from medfm.evals.report import write_report
    from medfm.evals.suite import load_suite, run_suite

    suite = load_suite(args.suite, args.overrides)  # ConfigError -> exit 2 before any model is loaded
    if args.cache:
        suite.cache_dir = args.cache
    out = Path(args.out or Path("runs") / "eval" / suite.name)
    accelerator = get_accelerator()
    try:
        model, weights, kind = load_model(args.source)
    except ModelSourceError as exc:
        raise ConfigError(str(exc)) from None
    results = run_suite(suite, model, weights, out, accelerator)
    if accelerator.is_main_process:
        report = write_report(results, out, suite.name, {"source": str(args.source), "kind": kind,
                                                         "weights_sha256": weights}, args.mlflow_run)
        failed = [t for t in report["tasks"] if t["status"] != "ok"]
        print(f"medfm eval: {len(report['tasks']) - len(failed)}/{len(report['tasks'])} tasks ok, "
              f"{len(report['results'])} metrics -> {out / 'report.json'}")
        for t in failed:
            print(f"medfm eval: task {t['task']} failed: {t['error']}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 1 if any(r.status != "ok" for r in results) else 0
