"""``medfm launch``: check the config against the world, write ``runs/<name>/``, then start this node's torchrun agent
(or print what would run with ``--dry-run``, or write a SLURM script with ``--slurm``).

Run directory::

    runs/<name>/config.yaml        the resolved config every rank (and every restart) reads
    runs/<name>/launches.jsonl     the world layout and torchrun command of every launch, one line each
    runs/<name>/checkpoints/       ZeRO-3 checkpoints ("latest" moves only after a complete save)
    runs/<name>/mlflow.db          run tracking (unless tracking.uri points at a server)
    runs/<name>/logs/<rdzv id>_*/attempt_<k>/<rank>/{stdout,stderr}.log   per rank and per restart attempt
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from medfm.launch.resolve import check_fresh_run, check_shards, resolve_config
from medfm.launch.world import World, has_cuda, torchrun_argv, worker_env
from medfm.pretrain.config import run_config_text, write_run_config
from medfm.pretrain.reshard import keep_global_batch
from medfm.schema import ConfigError


def prepare(config, overrides, world: World):
    """Resolve and check everything that can be checked before a process starts (ConfigError, one line)."""
    cfg = resolve_config(config, overrides)
    if len(world.world_sizes) == 1:  # a ZeRO-3 resume at another world size: its per-rank batch first (the workers
        keep_global_batch(cfg, world.world_sizes[0])  # find it kept), then the accumulation derived from it
    cfg.resolve_world(world.world_sizes)  # config.yaml then holds the derived grad_accum
    check_shards(cfg)
    check_fresh_run(cfg)
    return cfg


def dry_run_text(cfg, world: World, argv: list[str], env: dict) -> str:
    from medfm.launch.memory import count_model, device_kind, format_estimate
    from medfm.pretrain.ds_config import deepspeed_config

    lo, hi = world.node_range
    sections = [("resolved config", run_config_text(cfg).rstrip()), ("world", world.describe())]
    if cfg.train.strategy == "zero3":
        ds = deepspeed_config(cfg, world.world_sizes[-1])
        sections.append((f"DeepSpeed config (world size {world.world_sizes[-1]})", json.dumps(ds, indent=2)))
        sections.append(("memory", format_estimate(count_model(cfg), world.nproc_per_node, hi, cfg.zero, cfg,
                                                   device_kind(env))))
    else:
        sections.append(("DeepSpeed config", f"none: train.strategy={cfg.train.strategy}"))
    shown_env = {k: env[k] for k in ("OMP_NUM_THREADS", "DS_ACCELERATOR") if k in env}
    sections.append(("command", " ".join(argv) + "\n" + " ".join(f"{k}={v}" for k, v in shown_env.items())))
    return "\n\n".join(f"== {title} ==\n{body}" for title, body in sections)


def dry_run_verdict(cfg, world: World) -> int:
    """What a real start checks (launch/preflight.py): 0 when nothing is wrong, else each problem on stderr, exit 2."""
    from medfm.launch.preflight import run_preflight

    problems = run_preflight(cfg, world)
    for p in problems:
        print(f"medfm: error: {p}", file=sys.stderr)
    if not problems:
        print("preflight: model instantiated on meta; objectives, sources, tokenizer, one real batch and memory "
              "checked: ok")
    return 2 if problems else 0


def _record(run_dir: Path, world: World, argv: list[str], env: dict) -> None:
    """Append this node's launch to runs/<name>/launches.jsonl (one O_APPEND write per line, so the agents of a
    multi-node run sharing the directory never overwrite each other)."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": os.uname().nodename,
                       "node_rank": world.node_rank, "nnodes": world.nnodes, "nproc_per_node": world.nproc_per_node,
                       "max_restarts": world.max_restarts, "argv": argv,
                       "env": {k: env[k] for k in ("OMP_NUM_THREADS", "DS_ACCELERATOR") if k in env}}) + "\n"
    fd = os.open(run_dir / "launches.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_agent(argv: list[str], env: dict) -> int:
    """Run torchrun in the foreground; SIGINT/SIGTERM are forwarded so its workers shut down cleanly."""
    proc = subprocess.Popen(argv, env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def launch(args) -> int:
    endpoint = args.rdzv_endpoint
    if args.slurm and endpoint is None:  # the batch script finds the first node of its allocation at run time
        endpoint = "first-node-of-allocation:29500"
    world = World(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                  rdzv_endpoint=endpoint, max_restarts=args.max_restarts)
    cfg = prepare(args.config, args.overrides, world)
    run_dir = Path(cfg.run_dir)
    config_path = cfg.config_file.resolve()
    if args.slurm:
        from medfm.launch.slurm import write_script

        text = write_script(args.slurm, world, cfg, config_path, args.gpus_per_node, args.cpus_per_task,
                            args.signal_lead, args.sbatch, dry_run=args.dry_run)
        if args.dry_run:  # exactly the script a run without --dry-run writes (nothing is written)
            print(dry_run_text(cfg, world, ["sbatch", args.slurm], {}) + f"\n\n== {args.slurm} ==\n{text}")
            return 0
        print(f"wrote {args.slurm} ({world.node_range[1]} node(s) x {world.nproc_per_node} per node); "
              f"submit with: sbatch {args.slurm}")
        return 0
    env = worker_env(world, cuda=has_cuda())
    argv = torchrun_argv(world, config_path, cfg.name, (run_dir / "logs").resolve())
    if args.dry_run:
        print(dry_run_text(cfg, world, argv, env))
        return dry_run_verdict(cfg, world)
    write_run_config(cfg)  # the one write: every worker (and every restart) loads this file as it is
    _record(run_dir, world, argv, env)
    print(f"medfm launch: {cfg.name}: {world.describe().splitlines()[0]}; run dir {run_dir}", file=sys.stderr,
          flush=True)
    rc = run_agent(argv, env)
    if rc != 0:
        print(f"medfm launch: torchrun exited with {rc}; per-rank logs under {run_dir / 'logs'}", file=sys.stderr)
        return 1
    return 0


def load_resolved(run_dir) -> dict:
    """The resolved config a launch wrote (for sweeps and reports)."""
    from medfm.pretrain.config import CONFIG_FILE

    return yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())


__all__ = ["ConfigError", "World", "dry_run_text", "launch", "load_resolved", "prepare", "run_agent"]
