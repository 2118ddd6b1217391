"""``medfm launch ... --slurm out.sbatch``: a batch script that runs one torchrun agent per node with srun.

The rendezvous store lives on the first node of the allocation (``scontrol show hostnames``); every agent runs the
same resolved config (``runs/<name>/config.yaml``, written before the script), with the same environment rules as a
local launch (OMP threads = the task's CPUs / processes per node; DeepSpeed's CPU accelerator when a node has no
GPU). Elastic restarts work as locally: ``--max-restarts`` is passed to every agent.

CPU nodes (``--gpus-per-node 0``, the default) ask for ``--cpus-per-task``, never GPUs. The log directory exists
before submission (SLURM opens ``--output`` before the script runs). Preemption and time limits: the script asks for
SIGUSR1 ``--signal-lead`` seconds before the limit and is requeue-able; it passes the signal to the step, the workers
checkpoint at the next step boundary (medfm.pretrain.preemption), and on their marker the script requeues the job,
which resumes from that checkpoint. See docs/notes/launch.md.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from medfm.launch.world import World, torchrun_argv
from medfm.pretrain.preemption import MARKER
from medfm.schema import ConfigError

RDZV_PORT = 20000  # + job id % 10000
SIGNAL_LEAD_S = 180  # SIGUSR1 this long before the time limit: time for a step and a ZeRO-3 checkpoint
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


def check_resources(gpus_per_node: int, cpus_per_task: int | None, signal_lead: int) -> None:
    if gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: expected an integer >= 0 (0 = CPU nodes), got {gpus_per_node}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task: expected an integer >= 1, got {cpus_per_task}")
    if signal_lead < 0:
        raise ConfigError(f"--signal-lead: expected seconds >= 0 (0 = no warning signal), got {signal_lead}")


def render_sbatch(world: World, config_path: Path, run_name: str, run_dir: Path, python: str,
                  workdir: Path, gpus_per_node: int = 0, sbatch_options=(), port: int = RDZV_PORT,
                  cpus_per_task: int | None = None, signal_lead: int = SIGNAL_LEAD_S) -> str:
    """The batch script text.

    ``gpus_per_node=0`` means CPU nodes: no GPU request (sbatch refuses ``--gpus-per-node`` where the cluster has no
    GPU GRES), ``--cpus-per-task`` (default: one CPU per process) and DS_ACCELERATOR=cpu. ``signal_lead`` seconds
    before the time limit SLURM sends the batch shell SIGUSR1, which it passes to the workers (checkpoint, requeue).
    """
    lo, hi = world.node_range
    if lo != hi:
        raise ConfigError(f"--slurm: --nnodes {world.nnodes} is an elastic range; a SLURM allocation has a fixed "
                          "node count (resubmit with the new count instead)")
    check_resources(gpus_per_node, cpus_per_task, signal_lead)
    if not gpus_per_node and cpus_per_task is None:
        cpus_per_task = world.nproc_per_node
    q = shlex.quote
    logs = run_dir / "logs"
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={run_name}",
        f"#SBATCH --nodes={hi}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun agent per node; it forks the per-device workers
    ]
    if gpus_per_node:
        header.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        header.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    header += [
        # (write_script creates logs/ when it writes this script: SLURM opens --output before the script runs)
        f"#SBATCH --output={logs}/slurm-%j.out",
        "#SBATCH --open-mode=append",  # a requeued job appends to the same log
        "#SBATCH --requeue",
    ]
    if signal_lead:
        header.append(f"#SBATCH --signal=B:USR1@{signal_lead}")
    header += [f"#SBATCH --{k}" + (f"={v}" if v is not None else "") for k, v in sbatch_options]
    argv = torchrun_argv(World(world.nproc_per_node, str(hi), None, "HOST:1", world.max_restarts,
                               world.monitor_interval),
                         config_path, run_name, logs, endpoint="HOST:1", python=python, tee=False)
    argv[argv.index("torch.distributed.run")] = "medfm.launch.agent"  # torchrun that survives SIGUSR1 (agent.py)
    # Every word is shell-quoted except the rendezvous endpoint, which expands the head node at run time.
    words = [q(w) for w in argv]
    words[words.index("HOST:1")] = '"${head_node}:${rdzv_port}"'
    command = " \\\n    ".join(_pairs(words))
    marker = run_dir / MARKER
    body = [
        "set -euo pipefail",
        "",
        f"cd {q(str(workdir))}",
        f"mkdir -p {q(str(logs))}",
        f"requeue_marker={q(str(marker))}  # rank 0 writes it after a SIGUSR1 checkpoint",
        'rm -f "$requeue_marker"',
        "",
        "# Rendezvous on the first node of the allocation.",
        # (awk reads every line: `head -n 1` would SIGPIPE scontrol and fail the script under pipefail)
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\')',
        'if [ -z "$head_node" ]; then echo "medfm: no hosts in SLURM_JOB_NODELIST" >&2; exit 1; fi',
        "# A port per job: two jobs sharing a node must not meet in one rendezvous store.",
        f"rdzv_port=$(( {port} + ${{SLURM_JOB_ID:-0}} % 10000 ))",
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
        "# SIGUSR1 (the time-limit warning, or scancel --signal=USR1 --batch) reaches only this shell. Pass it to every",
        "# process of the srun step (srun forwards it), again every 5 s until the step ends: a worker still starting",
        "# ignores it (agent.py) and takes a later one. Workers finish their step, checkpoint and exit",
        "# (medfm/pretrain/preemption.py). Not in srun's first 3 s: its agent may not ignore SIGUSR1 yet.",
        'srun_pid="" srun_start=0 signalled="" last_forward=0',
        "forward() {",
        '    last_forward=$SECONDS',
        '    if [ -n "$srun_pid" ] && [ $(( SECONDS - srun_start )) -ge 3 ]; then kill -s USR1 "$srun_pid" 2>/dev/null || true; fi',
        "}",
        'trap \'[ -n "$signalled" ] || echo "medfm: caught SIGUSR1 at $(date +%T); checkpointing"; signalled=1; forward\' USR1',
        "",
        f'echo "medfm: {run_name} on $SLURM_JOB_NUM_NODES node(s), rendezvous ${{head_node}}:${{rdzv_port}}, '
        'job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}"',
        # srun does not inherit the batch's --cpus-per-task on every SLURM version: pass it on explicitly.
        'srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \\\n'
        "    " + command + " &",
        'srun_pid=$! srun_start=$SECONDS',
        # Once the checkpoint is complete (the marker says so) nothing is lost by requeueing: if the step has not
        # exited 10 s later (seen once: workers alive a minute after their checkpoint, until the time limit), requeue
        # anyway; SLURM ends the step.
        'marker_seen=""',
        'while kill -0 "$srun_pid" 2>/dev/null; do',
        '    if [ -z "$signalled" ]; then wait "$srun_pid" || true; continue; fi',
        '    sleep 1 & wait $! || true',
        '    if [ ! -f "$requeue_marker" ]; then',
        '        if [ $(( SECONDS - last_forward )) -ge 5 ]; then forward; fi',
        "        continue",
        "    fi",
        '    marker_seen=${marker_seen:-$SECONDS}',
        '    if [ $(( SECONDS - marker_seen )) -ge 10 ]; then',
        '        echo "medfm: the step is still running 10 s after its checkpoint; requeueing without waiting"; break',
        "    fi",
        "done",
        'rc=0',
        'if ! kill -0 "$srun_pid" 2>/dev/null; then wait "$srun_pid" || rc=$?; fi',
        "",
        "# The run stopped early on SIGUSR1 with a checkpoint: requeue this job; it resumes from that checkpoint.",
        'if [ -f "$requeue_marker" ]; then',
        '    echo "medfm: $(cat "$requeue_marker" | tr -d \'\\n\'); requeueing job $SLURM_JOB_ID"',
        '    rm -f "$requeue_marker"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(header + [""] + body)


def write_script(out, world: World, cfg, config_path: Path, gpus_per_node: int | None, cpus_per_task: int | None,
                 signal_lead: int | None, sbatch_items=(), dry_run: bool = False) -> str:
    """Render the script for ``cfg`` (already resolved and checked) and, unless ``dry_run``, write it, the resolved
    config, and the log directory SLURM opens ``--output`` in before the script runs."""
    from medfm.pretrain.config import write_run_config

    run_dir = Path(cfg.run_dir).resolve()
    text = render_sbatch(world, config_path, cfg.name, run_dir, sys.executable, Path.cwd(), gpus_per_node or 0,
                         parse_sbatch_options(sbatch_items), cpus_per_task=cpus_per_task,
                         signal_lead=SIGNAL_LEAD_S if signal_lead is None else signal_lead)
    if dry_run:
        return text
    write_run_config(cfg)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    return text


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
