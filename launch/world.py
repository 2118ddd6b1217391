"""The world layout of a launch and the torchrun command line + environment that realise it.

One ``torch.distributed.run`` agent per node, c10d rendezvous (so node ranks are assigned by the rendezvous and any
agent can be restarted), the rendezvous id taken from the run name, per-rank logs under ``runs/<name>/logs``.
Each worker runs ``python -m medfm.launch.worker CONFIG`` which chooses fresh-vs-resume for this attempt and then
calls pretrain's training entry with the resolved config.yaml in-process (see worker.py).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from medfm.schema import ConfigError


@dataclass
class World:
    nproc_per_node: int = 1
    nnodes: str = "1"  # "N" or elastic "MIN:MAX"
    node_rank: int | None = None  # only informative under c10d (the rendezvous assigns ranks)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous store (first node); None on one node = free port
    max_restarts: int = 0
    monitor_interval: float = 1.0

    def __post_init__(self):
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node: expected an integer >= 1, got {self.nproc_per_node}")
        lo, hi = self.node_range
        if lo < 1 or hi < lo:
            raise ConfigError(f"--nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got {self.nnodes!r}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts: expected an integer >= 0, got {self.max_restarts}")
        if self.node_rank is not None and not 0 <= self.node_rank < hi:
            raise ConfigError(f"--node-rank: expected 0..{hi - 1} for --nnodes {self.nnodes}, got {self.node_rank}")
        if hi > 1 and not self.rdzv_endpoint:
            raise ConfigError("--rdzv-endpoint: required with more than one node (host:port of the first node)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--rdzv-endpoint: expected host:port, got {self.rdzv_endpoint!r}")

    @property
    def node_range(self) -> tuple[int, int]:
        text = str(self.nnodes)
        try:
            lo, _, hi = text.partition(":")
            return int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--nnodes: expected N or MIN:MAX, got {text!r}") from None

    @property
    def world_sizes(self) -> list[int]:
        lo, hi = self.node_range
        return [n * self.nproc_per_node for n in range(lo, hi + 1)]

    def describe(self) -> str:
        lo, hi = self.node_range
        nodes = f"{lo}" if lo == hi else f"{lo}..{hi} (elastic)"
        sizes = self.world_sizes
        world = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}..{sizes[-1]}"
        lines = [f"nodes: {nodes} x {self.nproc_per_node} processes per node = world size {world}",
                 f"rendezvous: c10d at {self.rdzv_endpoint or '127.0.0.1:<free port>'}",
                 f"max restarts per agent: {self.max_restarts}"]
        if self.node_rank is not None:
            lines.append(f"this node: --node-rank {self.node_rank} (under c10d the rendezvous assigns the final rank)")
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


def worker_env(world: World, base: dict | None = None, cpus: int | None = None, cuda: bool | None = None) -> dict:
    """Environment for the agent and its workers: an even split of this node's cores into OMP threads per process
    (torchrun's default is 1, which starves CPU runs), and DeepSpeed's CPU accelerator when there is no GPU."""
    env = dict(os.environ if base is None else base)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // world.nproc_per_node)))
    if not (has_cuda() if cuda is None else cuda):
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor every step; torch
    # warns once per process per call site, which floods every rank's log without telling the user anything.
    quiet = "ignore::FutureWarning:torch.distributed.c10d_logger"
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), quiet) if w)
    return env


def torchrun_argv(world: World, config_path: str | Path, run_name: str, log_dir: str | Path,
                  endpoint: str | None = None, python: str | None = None, tee: bool = True) -> list[str]:
    """``python -m torch.distributed.run ... -m medfm.launch.worker CONFIG`` for this node.

    ``endpoint`` overrides the world's (the SLURM renderer passes a shell variable here)."""
    from medfm.launch.resolve import rdzv_id

    endpoint = endpoint or world.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    argv = [python or sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(world.nnodes),
            "--nproc-per-node", str(world.nproc_per_node),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint,
            "--rdzv-id", rdzv_id(run_name),
            "--max-restarts", str(world.max_restarts),
            "--monitor-interval", str(world.monitor_interval),
            "--log-dir", str(log_dir),
            # redirect every rank's stdout/stderr to logs/<run>_*/attempt_<k>/<rank>/{stdout,stderr}.log ...
            "--redirects", "3"]
    if tee:  # ... and still show them on this terminal, prefixed with the rank
        argv += ["--tee", "3"]
    if world.node_rank is not None:
        argv += ["--node-rank", str(world.node_rank)]
    argv += ["-m", "medfm.launch.worker", str(config_path)]
    return argv
