"""launch's subcommands of ``medfm``: ``launch``, ``sweep``, ``scaling fit|mixture`` (``add_cli``) and the arguments
of ``zoo release`` (``add_release``: launch's verb in model_zoo's group, placed there by launch/cli.py, because it
consolidates a training checkpoint, which model_zoo may not import)."""

from __future__ import annotations

import argparse

from medfm.schema import ConfigError
from medfm.schema.atomic import atomic_write


def _launch(args) -> int:
    from medfm.launch.launcher import launch

    return launch(args)


def _sweep(args) -> int:
    from medfm.launch.sweep import finalize, run_sweep, sweep_status

    if args.sweep == "status":  # `medfm sweep status SWEEP.yaml`
        if not args.target:
            raise ConfigError("medfm sweep status: expected SWEEP.yaml")
        return sweep_status(args.target)
    if args.target:
        raise ConfigError(f"medfm sweep: unexpected argument {args.target!r} (did you mean 'medfm sweep status "
                          f"{args.target}'?)")
    if args.finalize:
        return finalize(args.sweep, args.finalize)
    return run_sweep(args.sweep, dry_run=args.dry_run, only=args.only, backend=args.backend, resubmit=args.resubmit)


def _release(args) -> int:
    from medfm.launch.release import release

    release(args.checkpoint, args.name, args.version, args.zoo, args.eval_report, args.force)
    return 0


RELEASE_HELP = "consolidate a checkpoint and publish it into the model zoo"


def add_release(p) -> None:
    """Arguments of ``medfm zoo release`` (and of its spelling ``medfm release``) on the parser launch/cli.py made."""
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one stepN checkpoint")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--zoo", default=None, help="zoo directory (default $MEDFM_ZOO or ~/.cache/medfm/zoo)")
    p.add_argument("--eval", dest="eval_report", default=None, help="medfm eval's report.json for the card")
    p.add_argument("--force", action="store_true", help="replace an existing NAME:VERSION")
    p.set_defaults(func=_release)


def _scaling_fit(args) -> int:
    from medfm.launch.scaling import (
        fit_all,
        format_report,
        parse_budget,
        plot_fits,
        read_points,
        report_json,
        split_holdout,
    )

    points = read_points(args.results, n_col=args.n_col, d_col=args.d_col, loss_col=args.loss_col)
    budgets = [parse_budget(b) for b in args.budget]
    held = None
    if args.holdout:
        points, held = split_holdout(points, args.holdout)
    report, fits = fit_all(points, budgets, n_boot=args.bootstrap, seed=args.seed, names=(args.n_col, args.d_col),
                           progress=True, holdout=held)
    return _report(args, format_report(report), lambda: report_json(report),
                   lambda out: plot_fits(points, fits, report, out))


def _scaling_mixture(args) -> int:
    from medfm.launch.mixture import fit_mixture, format_mixture, mixture_json, plot_mixture, read_mixture_points

    if not args.target_samples > 0:
        raise ConfigError(f"--target-samples: expected a number > 0, got {args.target_samples}")
    pts = read_mixture_points(args.results, size=args.size)
    report, laws = fit_mixture(pts, args.target_samples, n_boot=args.bootstrap, seed=args.seed)
    return _report(args, format_mixture(report), lambda: mixture_json(report),
                   lambda out: plot_mixture(pts, laws, report, out))


def _report(args, text: str, as_json, plot) -> int:
    """Print a fit's report; write its JSON (``--json``, atomically) and figure (``--plot``) when asked."""
    print(text)
    if args.json:
        atomic_write(args.json, as_json() + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(args.plot)}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="start a (multi-node) torchrun world running `medfm pretrain`",
        description="Validate CONFIG against the world layout, write runs/<name>/, and start this node's torchrun "
                    "agent (c10d rendezvous, elastic restarts resume from the latest checkpoint).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10")
    p.add_argument("--nproc-per-node", type=int, default=1, help="worker processes on this node (one per GPU)")
    p.add_argument("--nnodes", default="1", help="number of nodes, or MIN:MAX for an elastic range")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (informative; c10d assigns ranks)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous on the first node")
    p.add_argument("--max-restarts", type=int, default=0, help="restarts of a failed worker group; each resumes "
                                                              "from the latest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print resolved config, world, DeepSpeed config and "
                                                         "memory estimate; start nothing")
    p.add_argument("--slurm", metavar="OUT.sbatch", default=None, help="write a SLURM batch script instead of running")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="with --slurm: GPUs to request per node (0 = CPU nodes: --cpus-per-task instead)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="with --slurm: CPUs per node's task (default on CPU nodes: one per process)")
    p.add_argument("--signal-lead", type=int, default=None, metavar="SECONDS",
                   help="with --slurm: SIGUSR1 this long before the time limit -> checkpoint and requeue "
                        "(default 180; 0 = none)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="with --slurm: extra #SBATCH option, e.g. --sbatch partition=gpu --sbatch time=24:00:00")
    p.set_defaults(func=_launch)

    s = subparsers.add_parser("sweep", help="run a model-size x data-budget grid for a scaling-law study",
                              description="Run every point of SWEEP.yaml as a normal launch (resumable: finished "
                                          "points are skipped) and collect final losses into one CSV.")
    s.add_argument("sweep", help="sweep YAML (see configs/sweep_tiny.yaml), or 'status' followed by the YAML")
    s.add_argument("target", nargs="?", default=None, help=argparse.SUPPRESS)
    s.add_argument("--dry-run", action="store_true", help="list the points and their status (slurm: print the "
                                                         "batch scripts); run and submit nothing")
    s.add_argument("--only", action="append", default=[], metavar="POINT", help="run only this point (repeatable)")
    s.add_argument("--backend", choices=("local", "slurm", "emit"), default=None,
                   help="where points run (default: the sweep's backend:, else local)")
    s.add_argument("--resubmit", action="store_true", help="slurm: submit points that were submitted before")
    s.add_argument("--finalize", default=None, metavar="POINT",
                   help="evaluate a trained point and update results.csv (the slurm backend's second job)")
    s.set_defaults(func=_sweep)

    sc = subparsers.add_parser("scaling", help="scaling-law fits of sweep results")
    sc_sub = sc.add_subparsers(dest="scaling_command", metavar="COMMAND", parser_class=type(sc))
    sc_sub.required = True
    f = sc_sub.add_parser("fit", help="fit L(N), L(D), L(N,D) (approach 3) and IsoFLOP profiles (approach 2); "
                          "compute-optimal frontier, extrapolation, holdout validation",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("results", help="results CSV (as written by medfm sweep)")
    f.add_argument("--plot", default=None, metavar="OUT.png", help="write the points/fits/frontier figure")
    f.add_argument("--json", default=None, metavar="OUT.json", help="write the fitted parameters and intervals")
    f.add_argument("--budget", action="append", default=[], metavar="NAME=FLOPS",
                   help="extrapolate the compute-optimal N*, D*, L* to this budget (repeatable; default 100x the "
                        "largest point)")
    f.add_argument("--n-col", default="params", help="column holding model size N")
    f.add_argument("--d-col", default="samples", help="column holding data size D")
    f.add_argument("--loss-col", default="eval_loss", help="column holding the final loss")
    f.add_argument("--holdout", action="append", default=[], metavar="largest|POINT[,POINT]",
                   help="fit without these points (largest = the largest compute budget) and report their predicted "
                        "vs measured loss with the 95%% prediction interval")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_scaling_fit)
    m = sc_sub.add_parser("mixture", help="per-modality held-out loss vs its samples; recommended source mixture",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("results", nargs="+", help="results CSV(s) of sweeps with weighted sources (see launch/mixture.py)")
    m.add_argument("--target-samples", type=float, required=True, help="training samples of the run to plan")
    m.add_argument("--size", default=None, help="use the points of this sweep size only (one model size)")
    m.add_argument("--plot", default=None, metavar="OUT.png")
    m.add_argument("--json", default=None, metavar="OUT.json")
    m.add_argument("--bootstrap", type=int, default=200)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_scaling_mixture)
