"""``medfm sweep SWEEP.yaml``: a model-size x data-budget (x data-mixture) grid for a scaling-law study.

Each point is a normal ``medfm launch`` of the base config plus the size's, the budget's and the mixture's overrides,
with its own run directory ``<out>/runs/<point>`` (``<size>__<budget>`` or ``<size>__<budget>__<mixture>``); every
point logs to one mlflow experiment (``<out>/mlflow.db`` unless ``tracking_uri`` is given). After training, the
point's held-out loss is measured (launch/evaluate.py: total and per objective) and the point is marked done
(``<out>/runs/<point>/point.json``); a rerun skips done points and resumes a half-trained one from its latest
checkpoint. ``<out>/results.csv`` is rewritten after every point and is what ``medfm scaling fit`` reads.

FLOPs: ``train_flops`` of a finished point is what its trainer recorded (the last ``train_flops`` of its
metrics.jsonl: pretrain/step_flops.py's definition, summed over ranks and steps); a ``compute:`` budget is turned
into samples a priori with the same module's ``planned_sample_flops``, and ``planned_train_flops`` keeps that
estimate beside the measured value.

Backends (``backend:`` or ``--backend``):

* ``local``   this node; ``max_parallel`` points side by side when ``max_parallel x nproc_per_node`` fits the cores
              (each point's processes get ``cores / (parallel x nproc)`` OMP threads).
* ``slurm``   one batch job per point, rendered by launch/slurm.py exactly as ``medfm launch --slurm`` renders it
              (``slurm.nnodes`` nodes x ``nproc_per_node``), plus a one-task job ``afterok`` that job which runs
              ``medfm sweep SWEEP.yaml --finalize POINT`` (held-out evaluation, point.json, results.csv). Scripts go
              to ``<out>/slurm/``; ``--dry-run`` prints them and submits nothing; job ids go to
              ``<run dir>/slurm.json`` so a rerun does not submit a queued point twice (``--resubmit`` does).
* ``emit``    print each pending point's launch command and its finalize command, for another scheduler.

``medfm sweep status SWEEP.yaml``: each point's state, steps, last loss and FLOPs from its run directory (mlflow when
the run directory has no metrics yet).

Example (configs/sweep_tiny.yaml)::

    name: scaling-tiny
    base: tiny_cpu.yaml                  # relative to this file
    overrides: ["train.progress=false"]
    out: runs/sweeps/scaling-tiny
    nproc_per_node: 1
    max_parallel: 2
    sizes:                               # named sizes: dotted overrides each
      - {name: w32, overrides: {model.towers.image.overrides.width: 32}}
    budgets:                             # samples (D), or compute (training FLOPs) -> samples a priori
      - {name: d256, samples: 256}
      - {name: c1e12, compute: 1.0e12}
    mixtures:                            # optional: source weights by source name (data.sources[].name or dir)
      - {name: img75, weights: {mri2d: 3, ecg: 1}}
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfm.pretrain.world_env import WORLD_ENV, env_outside_world
from medfm.schema import ConfigError, load_yaml
from medfm.schema.atomic import atomic_open, atomic_write

COLUMNS = ["name", "size", "budget", "mixture", "params", "samples", "steps", "flops_per_sample", "train_flops",
           "planned_train_flops", "train_loss", "eval_loss", "eval_split", "status", "started", "finished", "run_dir"]
BACKENDS = ("local", "slurm", "emit")
MEASURED = ("train_loss", "eval_loss", "eval_split", "train_flops", "flops_per_sample", "steps", "started",
            "finished")


@dataclass
class SizeSpec:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class BudgetSpec:
    name: str
    samples: int = 0  # training samples D (rounded up to whole global batches)
    compute: float = 0.0  # or training FLOPs C; samples = C / (planned training FLOPs per sample of the point)

    def validate(self):
        if (self.samples > 0) == (self.compute > 0):
            raise ValueError(f"budget {self.name!r}: give exactly one of samples > 0 or compute > 0")


@dataclass
class MixtureSpec:
    name: str
    weights: dict[str, float] = field(default_factory=dict)  # source name -> weight (unnamed sources keep theirs)

    def validate(self):
        if not self.weights:
            raise ValueError(f"mixture {self.name!r}: weights must name at least one source")
        bad = {k: v for k, v in self.weights.items() if not (isinstance(v, (int, float)) and v >= 0
                                                             and math.isfinite(v))}
        if bad:
            raise ValueError(f"mixture {self.name!r}: weights must be finite numbers >= 0, got {bad}")


@dataclass
class EvalSpec:
    split: str = "val"
    max_batches: int = 0  # 0 = the whole split
    seed: int = 0


@dataclass
class SlurmSpec:
    nnodes: int = 1
    gpus_per_node: int = -1  # -1: nproc_per_node; 0: CPU nodes
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options of the training jobs (partition=gpu)
    finalize_sbatch: list[str] = field(default_factory=list)  # of the evaluation jobs; default: the same


@dataclass
class SweepConfig:
    name: str
    base: str
    sizes: list[SizeSpec]
    budgets: list[BudgetSpec]
    mixtures: list[MixtureSpec] = field(default_factory=list)
    out: str = ""
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: int = 1
    max_restarts: int = 0
    backend: str = "local"
    max_parallel: int = 1  # local backend: points run side by side (capped so parallel x nproc <= cores)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    experiment: str = ""  # mlflow experiment; default: the sweep name
    tracking_uri: str = ""  # default sqlite:///<out>/mlflow.db
    eval: EvalSpec = field(default_factory=EvalSpec)
    timeout_s: float = 0.0  # per point; 0 = none

    def validate(self):
        for kind, items in (("sizes", self.sizes), ("budgets", self.budgets), ("mixtures", self.mixtures)):
            names = [x.name for x in items]
            if not names and kind != "mixtures":
                raise ValueError(f"{kind}: at least one is required")
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: duplicate name in {names}")
            bad = [n for n in names if not n or "/" in n or "__" in n]
            if bad:
                raise ValueError(f"{kind}: names must be non-empty without '/' or '__', got {bad}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_parallel < 1 or self.nproc_per_node < 1 or self.slurm.nnodes < 1:
            raise ValueError("max_parallel, nproc_per_node and slurm.nnodes must be >= 1")


@dataclass
class Point:
    size: SizeSpec
    budget: BudgetSpec
    mixture: MixtureSpec | None = None

    @property
    def name(self) -> str:
        parts = [self.size.name, self.budget.name] + ([self.mixture.name] if self.mixture else [])
        return "__".join(parts)


@dataclass
class Planned:
    point: Point
    cfg: Any  # the resolved RunConfig
    overrides: list[str]
    facts: dict  # static row fields: params, planned samples/steps/FLOPs, shares

    @property
    def run_dir(self) -> Path:
        return Path(self.facts["run_dir"])


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def load_sweep(path) -> tuple[SweepConfig, Path]:
    from medfm.configs.registry import locate

    cfg = load_yaml(path, SweepConfig, includes=False)  # a sweep's `base:` is its run recipe, not an include
    base = (locate(path).parent / cfg.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base: run config {base} not found")
    if not cfg.out:
        cfg.out = str(Path("runs") / "sweeps" / cfg.name)
    return cfg, base


# --------------------------------------------------------------------------------------------------- planning
def _source_name(src) -> str:
    return src.name or Path(src.path.rstrip("/")).name


def _source_modalities(src) -> list[str]:
    """Modalities of a local source from its manifest (empty for URL sources or unreadable manifests)."""
    from medfm.shards.manifest import MODALITIES

    path = Path(src.path) / "manifest.json"
    try:
        totals = json.loads(path.read_text()).get("totals", {}).get("modalities", {})
    except (OSError, json.JSONDecodeError):
        return []
    return [m for m in MODALITIES if totals.get(m)]


def mixture_overrides(cfg, mixture: MixtureSpec, where: str) -> list[str]:
    """The ``data.sources=[...]`` override that gives the sources of ``cfg`` the mixture's weights."""
    sources = cfg.data.sources
    names = [_source_name(s) for s in sources]
    unknown = [k for k in mixture.weights if k not in names]
    if unknown:
        raise ConfigError(f"{where}: mixture {mixture.name!r}: no source named {unknown[0]!r} (sources: "
                          f"{', '.join(names)})")
    if cfg.data.plan.policy != "all":
        raise ConfigError(f"{where}: mixture {mixture.name!r}: data.plan.policy must be 'all' (weights then set each "
                          f"batch's share of every source), got {cfg.data.plan.policy!r}")
    weights = [float(mixture.weights.get(n, s.weight)) for n, s in zip(names, sources)]
    if sum(weights) <= 0:
        raise ConfigError(f"{where}: mixture {mixture.name!r}: weights are all 0")
    new = []
    for n, s, w in zip(names, sources, weights):
        entry = {"path": s.path, "weight": w, "name": n}
        if s.group:
            entry["group"] = s.group
        new.append(entry)
    return [f"data.sources={_yaml_value(new)}"]


def source_shares(cfg) -> dict:
    """``share/<source>``: a source's share of batch slots (its normalised weight under plan policy "all"), and
    ``share/<modality>``: the share of training samples that carry the modality (from the sources' manifests)."""
    if cfg.data.plan.policy != "all" or len(cfg.data.sources) < 2:
        return {}
    total = sum(s.weight for s in cfg.data.sources)
    shares = {}
    for s in cfg.data.sources:
        share = s.weight / total
        shares[f"share/{_source_name(s)}"] = share
        for m in _source_modalities(s):
            shares[f"share/{m}"] = shares.get(f"share/{m}", 0.0) + share
    return shares


def plan_points(sweep: SweepConfig, base: Path) -> list[Planned]:
    """Every point with its resolved RunConfig, launch overrides and static facts (params, samples, steps, FLOPs).

    Resolving all points first means a bad size, budget or mixture fails the sweep before anything trains."""
    from medfm.launch.memory import count_model
    from medfm.launch.resolve import resolve_config
    from medfm.pretrain.step_flops import planned_sample_flops

    out = Path(sweep.out).resolve()
    uri = sweep.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    world = sweep.nproc_per_node * (sweep.slurm.nnodes if sweep.backend == "slurm" else 1)
    planned = []
    for size in sweep.sizes:
        for budget in sweep.budgets:
            for mixture in sweep.mixtures or [None]:
                point = Point(size, budget, mixture)
                ov = list(sweep.overrides) + [f"{k}={_yaml_value(v)}" for k, v in size.overrides.items()]
                ov += [f"name={point.name}", f"run_dir={out / 'runs' / point.name}",
                       f"tracking.experiment={sweep.experiment or sweep.name}", f"tracking.uri={uri}",
                       f"tracking.run_name={point.name}"]
                try:
                    if mixture is not None:
                        ov += mixture_overrides(resolve_config(base, ov), mixture, f"sweep point {point.name}")
                    cfg = resolve_config(base, ov)
                except ConfigError as exc:
                    msg = str(exc)
                    raise ConfigError(msg if msg.startswith("sweep point") else f"sweep point {point.name}: {msg}") \
                        from None
                per_step = cfg.global_batch(world)
                fps = planned_sample_flops(cfg)
                samples = budget.samples or int(budget.compute / fps)
                steps = max(1, math.ceil(samples / per_step))
                ov.append(f"train.steps={steps}")
                cfg.train.steps = steps
                params = count_model(cfg).total_params
                facts = {"name": point.name, "size": size.name, "budget": budget.name,
                         "mixture": mixture.name if mixture else "", "params": params,
                         "samples": steps * per_step, "steps": steps, "flops_per_sample": fps,
                         "planned_train_flops": fps * steps * per_step, "run_dir": str(out / "runs" / point.name),
                         **source_shares(cfg)}
                planned.append(Planned(point, cfg, ov, facts))
    return planned


# --------------------------------------------------------------------------------------------------- run dirs
def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step (the last record of a step wins, so steps redone after a restart count once)."""
    by_step: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return by_step
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            by_step.setdefault(rec["step"], {}).update(rec)
    return by_step


def _last_train_loss(by_step: dict[int, dict], steps: int) -> float:
    """Mean total loss over the last 10% of steps (at least 1)."""
    logged = [s for s in sorted(by_step) if "loss/total" in by_step[s]]
    tail = [by_step[s]["loss/total"] for s in logged[-max(1, steps // 10):]]
    return sum(tail) / len(tail) if tail else math.nan


def recorded_flops(by_step: dict[int, dict]) -> tuple[int, float, int]:
    """(last logged step, the trainer's cumulative train_flops there, samples_seen there); NaN/0 when absent."""
    logged = [s for s in sorted(by_step) if "train_flops" in by_step[s]]
    if not logged:
        return 0, math.nan, 0
    rec = by_step[logged[-1]]
    return logged[-1], float(rec["train_flops"]), int(rec.get("samples_seen", 0))


def _columns(rows: list[dict]) -> list[str]:
    extra = sorted({k for r in rows for k in r if k not in COLUMNS})
    return COLUMNS + extra


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = _columns(rows)
    with atomic_open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def point_row(p: Planned) -> dict:
    """The results row of a point from its run directory: measured fields from point.json when done, else its
    state (failed/submitted/pending) and the plan."""
    row = dict(p.facts)
    marker = p.run_dir / "point.json"
    attempt = p.run_dir / "attempt.json"
    if marker.is_file():
        row.update(json.loads(marker.read_text()))
        row["status"] = "done"
    elif attempt.is_file():
        row["status"] = json.loads(attempt.read_text()).get("status", "failed")
    elif (p.run_dir / "slurm.json").is_file():
        row["status"] = "submitted"
    else:
        row["status"] = "pending"
    return row


def collect(sweep: SweepConfig, planned: list[Planned]) -> Path:
    """Rewrite ``<out>/results.csv`` from every point's run directory, under a file lock (several finalize jobs may
    finish at once)."""
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".results.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_csv(out / "results.csv", [point_row(p) for p in planned])
    return out / "results.csv"


# --------------------------------------------------------------------------------------------------- one point
def _env(threads: int | None) -> dict:
    # a point's processes start worlds of their own; a driver inside a world would make evaluate join it
    env = env_outside_world()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch_argv(sweep: SweepConfig, base: Path, p: Planned, nnodes: int = 1) -> list[str]:
    """The ``medfm launch`` argv of a point (local backend and ``emit``); a half-trained point continues from its
    latest checkpoint (a fresh launch into a run dir holding checkpoints is refused)."""
    from medfm.model_zoo import checkpoint_io

    resume = ["checkpoint.resume=latest"] if checkpoint_io.latest(p.run_dir / "checkpoints") else []
    argv = ["-m", "medfm.launch.cli", "launch", str(base), *p.overrides, *resume,
            "--nproc-per-node", str(sweep.nproc_per_node), "--max-restarts", str(sweep.max_restarts)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes)]
    return argv


def finalize_argv(sweep_path, point: str) -> list[str]:
    return ["-m", "medfm.launch.cli", "sweep", str(sweep_path), "--finalize", point]


def _fail(p: Planned, status: str, started: str) -> dict:
    (p.run_dir / "attempt.json").write_text(json.dumps({"status": status, "started": started,
                                                        "finished": _now()}))
    return {"status": status}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def run_point(sweep: SweepConfig, base: Path, p: Planned, threads: int | None = None) -> dict:
    """Train one point through ``medfm launch``, then finalize it (held-out evaluation, point.json)."""
    started = _now()
    p.run_dir.mkdir(parents=True, exist_ok=True)
    (p.run_dir / "attempt.json").unlink(missing_ok=True)
    timeout = sweep.timeout_s or None
    log = p.run_dir.parent / f"{p.run_dir.name}.launch.log"
    with log.open("a") as fh:
        try:
            rc = subprocess.run([sys.executable, *launch_argv(sweep, base, p)], stdout=fh, stderr=subprocess.STDOUT,
                                timeout=timeout, env=_env(threads)).returncode
        except subprocess.TimeoutExpired:
            return _fail(p, "timeout", started)
    if rc != 0:
        print(f"medfm sweep: {p.point.name} failed (exit {rc}); see {log}", file=sys.stderr)
        return _fail(p, f"failed({rc})", started)
    return finalize_point(sweep, p, threads, started)


def finalize_point(sweep: SweepConfig, p: Planned, threads: int | None = None, started: str = "") -> dict:
    """Held-out evaluation of a trained point, its measured row from the run directory, and its point.json."""
    e = sweep.eval
    timeout = sweep.timeout_s or None
    try:
        proc = subprocess.run([sys.executable, "-m", "medfm.launch.evaluate", str(p.run_dir), "--split", e.split,
                               "--max-batches", str(e.max_batches), "--seed", str(e.seed)],
                              capture_output=True, text=True, timeout=timeout, env=_env(threads))
    except subprocess.TimeoutExpired:
        return _fail(p, "eval_timeout", started)
    if proc.returncode != 0:
        print(f"medfm sweep: {p.point.name} evaluation failed: {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return _fail(p, "eval_failed", started)
    val = json.loads(proc.stdout.strip().splitlines()[-1])
    by_step = read_metrics(p.run_dir)
    step, flops, seen = recorded_flops(by_step)
    row = {"train_loss": _last_train_loss(by_step, p.facts["steps"]), "eval_loss": val["total"],
           "eval_split": val["split"], "train_flops": flops, "steps": step or p.facts["steps"],
           "flops_per_sample": flops / seen if seen else math.nan,
           "started": started or _now(), "finished": _now(),
           **{f"eval_loss/{k}": v for k, v in val["losses"].items()}}
    if seen and seen != p.facts["samples"]:
        row["samples"] = seen
    atomic_write(p.run_dir / "point.json", json.dumps(row))
    (p.run_dir / "attempt.json").unlink(missing_ok=True)
    return {"status": "done", **row}


# --------------------------------------------------------------------------------------------------- backends
def parallel_slots(max_parallel: int, nproc: int, cores: int | None = None) -> int:
    """Points run side by side: max_parallel, capped so that parallel x nproc_per_node <= cores (at least 1)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(max_parallel, cores // nproc))


def _run_local(sweep: SweepConfig, base: Path, todo: list[Planned], planned: list[Planned]) -> int:
    from tqdm import tqdm

    cores = os.cpu_count() or 1
    slots = parallel_slots(sweep.max_parallel, sweep.nproc_per_node, cores)
    if slots < sweep.max_parallel:
        print(f"medfm sweep: max_parallel {sweep.max_parallel} x nproc_per_node {sweep.nproc_per_node} exceeds "
              f"{cores} cores: running {slots} point(s) at a time", file=sys.stderr)
    threads = max(1, cores // (slots * sweep.nproc_per_node))
    failed = 0
    bar = tqdm(total=len(todo), desc=f"sweep {sweep.name}", unit="point", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=slots) as pool:
        running = {pool.submit(run_point, sweep, base, p, threads): p for p in todo}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                p = running.pop(fut)
                try:
                    status = fut.result()["status"]
                except Exception as exc:  # one broken point never ends the sweep
                    print(f"medfm sweep: {p.point.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    status = "failed"
                failed += status != "done"
                bar.update(1)
                bar.set_postfix_str(f"{p.point.name}: {status}")
                collect(sweep, planned)
    bar.close()
    return failed


def _slurm_scripts(sweep: SweepConfig, sweep_path: Path, base: Path, p: Planned) -> tuple[str, str, Any]:
    """(training script, finalize script, resolved config) of a point. The training script is launch/slurm.py's ``render_sbatch`` of
    the same world and config a ``medfm launch --slurm`` of the point renders."""
    from medfm.launch.launcher import prepare
    from medfm.launch.slurm import parse_sbatch_options, render_sbatch
    from medfm.launch.world import World

    s = sweep.slurm
    world = World(nproc_per_node=sweep.nproc_per_node, nnodes=str(s.nnodes), node_rank=None,
                  rdzv_endpoint="first-node-of-allocation:29500", max_restarts=sweep.max_restarts)
    cfg = prepare(base, p.overrides, world)
    run_dir = Path(cfg.run_dir).resolve()
    gpus = sweep.nproc_per_node if s.gpus_per_node < 0 else s.gpus_per_node
    train = render_sbatch(world, run_dir / "config.yaml", cfg.name, run_dir, sys.executable, Path.cwd(),
                          gpus, parse_sbatch_options(s.sbatch))
    q = shlex.quote
    options = parse_sbatch_options(s.finalize_sbatch or s.sbatch)
    logs = run_dir / "logs"
    finalize = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={cfg.name}-eval",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --output={logs}/slurm-eval-%j.out",
        *[f"#SBATCH --{k}" + (f"={v}" if v is not None else "") for k, v in options],
        "",
        "set -euo pipefail",
        f"cd {q(str(Path.cwd()))}",
        f"mkdir -p {q(str(logs))}",
        "export PYTHONUNBUFFERED=1",
        f"unset {' '.join(WORLD_ENV)}  # sbatch exports the submitter's environment; evaluation is a world of one",
        " ".join(q(w) for w in [sys.executable, *finalize_argv(sweep_path.resolve(), p.point.name)]),
        "",
    ])
    return train, finalize, cfg


def _sbatch(script: Path, dependency: str | None = None) -> str:
    argv = ["sbatch", "--parsable"] + ([f"--dependency={dependency}"] if dependency else []) + [str(script)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().split(";")[0]


def _run_slurm(sweep: SweepConfig, sweep_path: Path, base: Path, todo: list[Planned], dry_run: bool,
               resubmit: bool) -> int:
    from medfm.pretrain.config import write_run_config

    out = Path(sweep.out)
    failed = 0
    for p in todo:
        info = p.run_dir / "slurm.json"
        if info.is_file() and not resubmit and not dry_run:
            print(f"{p.point.name}: already submitted ({json.loads(info.read_text())}); --resubmit to submit again")
            continue
        train, finalize, cfg = _slurm_scripts(sweep, sweep_path, base, p)
        if dry_run:
            print(f"### {p.point.name}: {out / 'slurm' / (p.point.name + '.sbatch')}\n{train}")
            print(f"### {p.point.name}: {out / 'slurm' / (p.point.name + '.finalize.sbatch')} "
                  f"(afterok the training job)\n{finalize}")
            continue
        scripts = out / "slurm"
        scripts.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg)  # cfg.run_dir is p.run_dir (the point's run_dir override)
        (p.run_dir / "logs").mkdir(exist_ok=True)  # SLURM opens the jobs' --output files before the scripts run
        train_path, fin_path = scripts / f"{p.point.name}.sbatch", scripts / f"{p.point.name}.finalize.sbatch"
        for path, text in ((train_path, train), (fin_path, finalize)):
            path.write_text(text)
            path.chmod(0o755)
        try:
            job = _sbatch(train_path)
            fin = _sbatch(fin_path, f"afterok:{job}")
        except (OSError, RuntimeError) as exc:  # one refused submission never ends the sweep
            print(f"medfm sweep: {p.point.name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        (p.run_dir / "attempt.json").unlink(missing_ok=True)
        info.write_text(json.dumps({"train_job": job, "finalize_job": fin, "submitted": _now()}))
        print(f"{p.point.name}: submitted job {job} (evaluation job {fin} afterok:{job})")
    return failed


def _emit(sweep: SweepConfig, sweep_path: Path, base: Path, todo: list[Planned]) -> None:
    py = shlex.quote(sys.executable)
    nnodes = sweep.slurm.nnodes
    for p in todo:
        launch = " ".join(shlex.quote(w) for w in launch_argv(sweep, base, p, nnodes))
        if nnodes > 1:
            launch += ' --node-rank "$NODE_RANK" --rdzv-endpoint "$MASTER_ADDR:29500"'
        fin = " ".join(shlex.quote(w) for w in finalize_argv(sweep_path, p.point.name))
        print(f"# {p.point.name}" + (f" (on each of {nnodes} nodes; finalize once, on one)" if nnodes > 1 else ""))
        print(f"{py} {launch} && \\\n  {py} {fin}")


def run_sweep(path, dry_run: bool = False, only=(), backend: str | None = None, resubmit: bool = False) -> int:
    sweep, base = load_sweep(path)
    if backend:
        sweep.backend = backend
    planned = plan_points(sweep, base)
    names = [p.point.name for p in planned]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r}: no such point (points: {', '.join(names)})")
    rows = {p.point.name: point_row(p) for p in planned}
    todo = [p for p in planned if rows[p.point.name]["status"] != "done" and (not only or p.point.name in only)]
    if dry_run and sweep.backend != "slurm":
        for r in rows.values():
            print(f"{r['name']:<28} params={r['params']:>11,} samples={r['samples']:>8} steps={r['steps']:>6} "
                  f"planned_train_flops={r['planned_train_flops']:.3g} {r['status']}")
        return 0
    if sweep.backend == "emit":
        _emit(sweep, Path(path), base, todo)
        return 0
    if sweep.backend == "slurm":
        failed = _run_slurm(sweep, Path(path), base, todo, dry_run, resubmit)
        if not dry_run:
            print(f"wrote {collect(sweep, planned)}")
        return 1 if failed else 0
    failed = _run_local(sweep, base, todo, planned) if todo else 0
    out = collect(sweep, planned)
    done = sum(point_row(p)["status"] == "done" for p in planned)
    print(f"wrote {out} ({done}/{len(planned)} points done)")
    return 1 if failed else 0


def finalize(path, point: str) -> int:
    """``medfm sweep SWEEP.yaml --finalize POINT``: evaluate a trained point and rewrite results.csv (the second job
    of the slurm backend, the second command of ``emit``)."""
    sweep, base = load_sweep(path)
    planned = plan_points(sweep, base)
    match = [p for p in planned if p.point.name == point]
    if not match:
        raise ConfigError(f"--finalize {point!r}: no such point (points: {', '.join(p.point.name for p in planned)})")
    p = match[0]
    if not (p.run_dir / "checkpoints").is_dir():
        raise ConfigError(f"--finalize {point}: {p.run_dir} has no checkpoints (has the point trained?)")
    status = finalize_point(sweep, p)["status"]
    print(f"{point}: {status}; wrote {collect(sweep, planned)}")
    return 0 if status == "done" else 1


# --------------------------------------------------------------------------------------------------- status
def _mlflow_latest(uri: str, experiment: str, run_name: str) -> dict:
    """Latest metrics and state of a point's mlflow run ({} when mlflow or the run is absent)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return {}
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return {}
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'", max_results=1,
                                  order_by=["attribute.start_time DESC"])
    except Exception:  # an unreadable tracking store is reported as "no mlflow data", not a crash of status
        return {}
    if not runs:
        return {}
    run = runs[0]
    m = run.data.metrics
    history = client.get_metric_history(run.info.run_id, "loss/total")
    return {"mlflow": run.info.status, "step": max((h.step for h in history), default=0),
            "loss": m.get("loss/total", math.nan), "train_flops": m.get("train_flops", math.nan)}


def status_rows(sweep: SweepConfig, planned: list[Planned]) -> list[dict]:
    out = Path(sweep.out).resolve()
    uri = sweep.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    has_db = not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()
    rows = []
    for p in planned:
        row = point_row(p)
        by_step = read_metrics(p.run_dir)
        step, flops, _ = recorded_flops(by_step)
        logged = [s for s in sorted(by_step) if "loss/total" in by_step[s]]
        state = row["status"]
        if state in ("pending", "submitted") and by_step:
            state = "training" if state == "pending" else "submitted/training"
        info = {"name": p.point.name, "state": state, "step": step or (logged[-1] if logged else 0),
                "steps": p.facts["steps"], "loss": by_step[logged[-1]]["loss/total"] if logged else math.nan,
                "train_flops": flops, "eval_loss": row.get("eval_loss", math.nan), "source": "run dir"}
        if not by_step and has_db:
            ml = _mlflow_latest(uri, sweep.experiment or sweep.name, p.point.name)
            if ml:
                info.update(step=ml["step"], loss=ml["loss"], train_flops=ml["train_flops"],
                            source=f"mlflow ({ml['mlflow']})")
        rows.append(info)
    return rows


def sweep_status(path) -> int:
    sweep, base = load_sweep(path)
    planned = plan_points(sweep, base)
    rows = status_rows(sweep, planned)

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    print(f"{'point':<28} {'state':<18} {'steps':>11} {'loss':>8} {'train_flops':>11} {'eval_loss':>9}  source")
    for r in rows:
        print(f"{r['name']:<28} {r['state']:<18} {r['step']:>5}/{r['steps']:<5} {num(r['loss'], '.4f'):>8} "
              f"{num(r['train_flops'], '.3g'):>11} {num(r['eval_loss'], '.4f'):>9}  {r['source']}")
    done = sum(r["state"] == "done" for r in rows)
    print(f"{done}/{len(rows)} points done")
    return 0
