"""``medfm launch ... --slurm out.sbatch``: a batch script that runs one torchrun agent per node with srun.

The rendezvous store lives on the first node of the allocation (``scontrol show hostnames``); every agent runs the
same resolved config (``runs/<name>/config.yaml``, written before the script), with the same environment rules as a
local launch (OMP threads = the task's CPUs / processes per node; DeepSpeed's CPU accelerator when a node has no
GPU). Elastic restarts work as locally: ``--max-restarts`` is passed to every agent.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from medfm.launch.world import World, torchrun_argv
from medfm.schema import ConfigError

RDZV_PORT = 29500
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


def parse_sbatch_options(items) -> list[tuple[str, str | None]]:
    """``--sbatch partition=gpu --sbatch exclusive`` -> [("partition", "gpu"), ("exclusive", None)]."""
    out = []
    for item in items or ():
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not _SBATCH_KEY.match(key):
            raise ConfigError(f"--sbatch {item!r}: expected an sbatch long option such as partition=gpu or time=24:00:00")
        if any(c in value for c in "\n\r"):
            raise ConfigError(f"--sbatch {item!r}: a value cannot contain a newline")
        out.append((key, value if eq else None))
    return out


def render_sbatch(world: World, config_path: Path, run_name: str, run_dir: Path, python: str,
                  workdir: Path, gpus_per_node: int | None, sbatch_options=(), port: int = RDZV_PORT) -> str:
    """The batch script text. ``gpus_per_node=None`` means CPU nodes (no --gpus-per-node, DS_ACCELERATOR=cpu)."""
    lo, hi = world.node_range
    if lo != hi:
        raise ConfigError(f"--slurm: --nnodes {world.nnodes} is an elastic range; a SLURM allocation has a fixed "
                          "node count (resubmit with the new count instead)")
    q = shlex.quote
    logs = run_dir / "logs"
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={run_name}",
        f"#SBATCH --nodes={hi}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun agent per node; it forks the per-device workers
        f"#SBATCH --output={logs}/slurm-%j.out",
    ]
    if gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    header += [f"#SBATCH --{k}" + (f"={v}" if v is not None else "") for k, v in sbatch_options]
    argv = torchrun_argv(World(world.nproc_per_node, str(hi), None, "HOST:1", world.max_restarts,
                               world.monitor_interval),
                         config_path, run_name, logs, endpoint="HOST:1", python=python, tee=False)
    # Every word is shell-quoted except the rendezvous endpoint, which expands the head node at run time.
    words = [q(w) for w in argv]
    words[words.index("HOST:1")] = f'"${{head_node}}:{port}"'
    command = " \\\n    ".join(_pairs(words))
    body = [
        "set -euo pipefail",
        "",
        f"cd {q(str(workdir))}",
        f"mkdir -p {q(str(logs))}",
        "",
        "# Rendezvous on the first node of the allocation.",
        # (awk reads every line: `head -n 1` would SIGPIPE scontrol and fail the script under pipefail)
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\')',
        'if [ -z "$head_node" ]; then echo "medfm: no hosts in SLURM_JOB_NODELIST" >&2; exit 1; fi',
        "",
        f"# OMP threads per worker: this task's CPUs split over the {world.nproc_per_node} processes of a node.",
        'cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"',
        f"export OMP_NUM_THREADS=$(( cpus / {world.nproc_per_node} > 0 ? cpus / {world.nproc_per_node} : 1 ))",
        "export PYTHONUNBUFFERED=1",
    ]
    if not gpus_per_node:
        body.append("export DS_ACCELERATOR=cpu")
    body += [
        "",
        f'echo "medfm: {run_name} on $SLURM_JOB_NUM_NODES node(s), rendezvous ${{head_node}}:{port}"',
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 \\\n    " + command,
        "",
    ]
    return "\n".join(header + [""] + body)


def _pairs(words: list[str]) -> list[str]:
    """Group ``--flag value`` (and ``-m module``) pairs on one line each, for a readable script."""
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w.startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            out.append(f"{w} {words[i + 1]}")
            i += 2
        else:
            out.append(w)
            i += 1
    return out
