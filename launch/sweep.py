"""``medfm sweep SWEEP.yaml``: a model-size x data-budget grid for a scaling-law study.

Each point is a normal ``medfm launch`` of the base config plus the size's and the budget's overrides, with its own
run directory ``<out>/runs/<size>__<budget>``; every point logs to one mlflow experiment (``<out>/mlflow.db`` unless
``tracking_uri`` is given). After training, the point's held-out loss is measured (launch/evaluate.py) and the point
is marked done (``<out>/runs/<point>/point.json``); a rerun of the sweep skips done points and resumes a half-trained
one from its latest checkpoint. ``<out>/results.csv`` is rewritten after every point and is what
``medfm scaling fit`` reads.

Example (configs/sweep_tiny.yaml)::

    name: scaling-tiny
    base: tiny_cpu.yaml                  # relative to this file
    overrides: ["train.progress=false"]
    out: runs/sweeps/scaling-tiny
    nproc_per_node: 1
    sizes:                               # named sizes: dotted overrides each
      - {name: w32, overrides: {model.towers.image.overrides.width: 32}}
    budgets:                             # samples (D), or compute (training FLOPs) -> samples via model_zoo FLOPs
      - {name: d256, samples: 256}
      - {name: c1e12, compute: 1.0e12}
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfm.schema import ConfigError, load_yaml

COLUMNS = ["name", "size", "budget", "params", "samples", "steps", "flops_per_sample", "train_flops", "train_loss",
           "eval_loss", "eval_split", "status", "run_dir"]


@dataclass
class SizeSpec:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class BudgetSpec:
    name: str
    samples: int = 0  # training samples D (rounded up to whole global batches)
    compute: float = 0.0  # or training FLOPs C; samples = C / (training FLOPs per sample of the point's model)

    def validate(self):
        if (self.samples > 0) == (self.compute > 0):
            raise ValueError(f"budget {self.name!r}: give exactly one of samples > 0 or compute > 0")


@dataclass
class EvalSpec:
    split: str = "val"
    max_batches: int = 0  # 0 = the whole split
    seed: int = 0


@dataclass
class SweepConfig:
    name: str
    base: str
    sizes: list[SizeSpec]
    budgets: list[BudgetSpec]
    out: str = ""
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: int = 1
    max_restarts: int = 0
    experiment: str = ""  # mlflow experiment; default: the sweep name
    tracking_uri: str = ""  # default sqlite:///<out>/mlflow.db
    eval: EvalSpec = field(default_factory=EvalSpec)
    timeout_s: float = 0.0  # per point; 0 = none

    def validate(self):
        for kind, items in (("sizes", self.sizes), ("budgets", self.budgets)):
            names = [x.name for x in items]
            if not names:
                raise ValueError(f"{kind}: at least one is required")
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: duplicate name in {names}")
            bad = [n for n in names if not n or "/" in n or "__" in n]
            if bad:
                raise ValueError(f"{kind}: names must be non-empty without '/' or '__', got {bad}")


@dataclass
class Point:
    size: SizeSpec
    budget: BudgetSpec

    @property
    def name(self) -> str:
        return f"{self.size.name}__{self.budget.name}"


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def load_sweep(path) -> tuple[SweepConfig, Path]:
    cfg = load_yaml(path, SweepConfig)
    base = (Path(path).parent / cfg.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base: run config {base} not found")
    if not cfg.out:
        cfg.out = str(Path("runs") / "sweeps" / cfg.name)
    return cfg, base


def sample_flops(run_cfg) -> int:
    """Training FLOPs per sample from model_zoo's analytic counts: 3x forward of every objective's encoders (MAE:
    visible patches + decoder), input shapes from the collate config."""
    import torch

    from medfm.model_zoo import build_multimodal
    from medfm.model_zoo.flops import forward_flops, mae_forward_flops, train_flops
    from medfm.pretrain.objectives import DEFAULT_MASK_RATIO

    with torch.device("meta"):
        model = build_multimodal(run_cfg.model)
    col = run_cfg.data.collate

    def shape(modality, tower):
        cfg = tower.cfg
        if modality == "image" and col.image_size:
            return (col.image_channels or cfg.in_chans, *col.image_size)
        if modality == "volume" and col.volume_size:
            return (cfg.in_chans, *col.volume_size)
        if modality == "signal" and col.signal_length:
            return (col.signal_leads or cfg.n_leads, col.signal_length)
        if modality == "ehr":
            return (col.ehr_max_events,)
        if modality == "text":
            return (col.text_max_tokens,)
        return None

    total, plain = 0, set()
    dec = run_cfg.model.mae_decoder
    for o in run_cfg.objectives:
        if o.kind == "mae":
            m = o.modalities[0]
            ratio = o.mask_ratio if o.mask_ratio is not None else DEFAULT_MASK_RATIO[m]
            total += mae_forward_flops(model.towers[m], ratio, shape(m, model.towers[m]), dec.width, dec.depth,
                                       dec.mlp_ratio)
        else:
            plain.update(o.modalities)
    for m in plain:  # each tower's full forward once per step (shared between objectives by the step cache)
        total += forward_flops(model.towers[m], shape(m, model.towers[m]))
    return train_flops(total)


def _last_train_loss(run_dir: Path, steps: int) -> float:
    """Mean total loss over the last 10% of steps (at least 1), from metrics.jsonl (last record per step wins, so
    steps redone after a restart count once)."""
    by_step = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return math.nan
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss/total" in rec:
            by_step[rec["step"]] = rec["loss/total"]
    tail = [by_step[s] for s in sorted(by_step)[-max(1, steps // 10):]]
    return sum(tail) / len(tail) if tail else math.nan


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    os.replace(tmp, path)


def plan_points(sweep: SweepConfig, base: Path) -> list[tuple[Point, object, list[str], dict]]:
    """Every point with its resolved RunConfig, launch overrides and static facts (params, samples, steps, FLOPs).

    Resolving all points first means a bad size or budget fails the sweep before anything trains."""
    from medfm.launch.memory import count_model
    from medfm.launch.resolve import resolve_config

    out = Path(sweep.out).resolve()
    uri = sweep.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    planned = []
    for size in sweep.sizes:
        for budget in sweep.budgets:
            point = Point(size, budget)
            ov = list(sweep.overrides) + [f"{k}={_yaml_value(v)}" for k, v in size.overrides.items()]
            ov += [f"name={point.name}", f"run_dir={out / 'runs' / point.name}",
                   f"tracking.experiment={sweep.experiment or sweep.name}", f"tracking.uri={uri}",
                   f"tracking.run_name={point.name}"]
            try:
                cfg = resolve_config(base, ov)
            except ConfigError as exc:
                raise ConfigError(f"sweep point {point.name}: {exc}") from None
            per_step = cfg.train.micro_batch * cfg.train.grad_accum * sweep.nproc_per_node
            fps = sample_flops(cfg)
            samples = budget.samples or int(budget.compute / fps)
            steps = max(1, math.ceil(samples / per_step))
            ov.append(f"train.steps={steps}")
            cfg.train.steps = steps
            params = count_model(cfg).total_params
            facts = {"name": point.name, "size": size.name, "budget": budget.name, "params": params,
                     "samples": steps * per_step, "steps": steps, "flops_per_sample": fps,
                     "train_flops": fps * steps * per_step, "run_dir": str(out / "runs" / point.name)}
            planned.append((point, cfg, ov, facts))
    return planned


def run_sweep(path, dry_run: bool = False, only=()) -> int:
    sweep, base = load_sweep(path)
    planned = plan_points(sweep, base)
    names = [p.name for p, *_ in planned]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r}: no such point (points: {', '.join(names)})")
    out = Path(sweep.out)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    from tqdm import tqdm

    bar = tqdm(planned, desc=f"sweep {sweep.name}", unit="point", file=sys.stderr, disable=dry_run)
    for point, cfg, ov, facts in bar:
        run_dir = Path(facts["run_dir"])
        marker = run_dir / "point.json"
        row = dict(facts)
        if marker.is_file():
            row.update(json.loads(marker.read_text()))
            row["status"] = "done"
        elif dry_run or (only and point.name not in only):
            row["status"] = "pending"
        else:
            bar.set_postfix_str(point.name)
            row.update(_run_point(sweep, base, ov, run_dir, cfg.train.steps))
            if row["status"] == "done":
                marker.write_text(json.dumps({k: row[k] for k in ("train_loss", "eval_loss", "eval_split")}))
            else:
                failed += 1
        rows.append(row)
        if not dry_run:
            _write_csv(out / "results.csv", rows + [dict(f, status="pending") for _, _, _, f in planned[len(rows):]])
    if dry_run:
        for r in rows:
            print(f"{r['name']:<28} params={r['params']:>11,} samples={r['samples']:>8} steps={r['steps']:>6} "
                  f"train_flops={r['train_flops']:.3g} {r['status']}")
        return 0
    print(f"wrote {out / 'results.csv'} ({sum(r['status'] == 'done' for r in rows)}/{len(rows)} points done)")
    return 1 if failed else 0


def _run_point(sweep: SweepConfig, base: Path, ov: list[str], run_dir: Path, steps: int) -> dict:
    from medfm.model_zoo import checkpoint_io

    resume = ["checkpoint.resume=latest"] if checkpoint_io.latest(run_dir / "checkpoints") else []  # half-trained
    cmd = [sys.executable, "-m", "medfm.launch.cli", "launch", str(base), *ov, *resume,
           "--nproc-per-node", str(sweep.nproc_per_node), "--max-restarts", str(sweep.max_restarts)]
    timeout = sweep.timeout_s or None
    log = run_dir.parent / f"{run_dir.name}.launch.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"status": "timeout"}
    if rc != 0:
        print(f"medfm sweep: {run_dir.name} failed (exit {rc}); see {log}", file=sys.stderr)
        return {"status": f"failed({rc})"}
    e = sweep.eval
    proc = subprocess.run([sys.executable, "-m", "medfm.launch.evaluate", str(run_dir), "--split", e.split,
                           "--max-batches", str(e.max_batches), "--seed", str(e.seed)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(f"medfm sweep: {run_dir.name} evaluation failed: {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return {"status": "eval_failed"}
    val = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "done", "train_loss": _last_train_loss(run_dir, steps), "eval_loss": val["total"],
            "eval_split": val["split"]}
