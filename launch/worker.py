"""The torchrun entry point of ``medfm launch``: one worker = one pretraining rank.

``python -m medfm.launch.worker CONFIG [key=value ...]``

CONFIG is the resolved ``runs/<name>/config.yaml`` the launcher wrote: the worker loads it once (no second
resolution, no re-entry into the ``medfm`` CLI) and calls pretrain's training entry with that RunConfig.

Why a wrapper and not ``medfm pretrain`` directly: torchrun restarts the *same* command after a failure, but the
restarted attempt must resume from the newest complete checkpoint while the first attempt of a fresh run must not
(``checkpoint.resume=latest`` fails when there is none). The wrapper decides per attempt (``_restarted``) on the
loaded config, then trains in this process. Resuming restores the loader state and RNG with the weights, so no sample
is lost or repeated.

Fault injection for the restart tests (``MEDFM_FAULT=MODE:STEP[:RANK[:ATTEMPT]]``, never set in normal runs) is
pretrain's public hook (medfm.pretrain.faults, read by its training loop); the wrapper only checks the spec up front
so a typo fails before torchrun starts training.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _latest_step(ckpt_root: Path) -> int | None:
    from medfm.model_zoo import checkpoint_io

    tag = checkpoint_io.latest(ckpt_root)
    return checkpoint_io.step_of(tag) if tag else None


def _restarted() -> bool:
    """A restart of this launch (torchrun's next attempt, or a SLURM requeue of the same job): its checkpoints are
    this run's own. A first attempt never resumes on its own — a fresh launch into a run dir holding checkpoints is
    refused (by ``medfm launch`` up front, else by pretrain's fresh-run guard) unless checkpoint.resume asks."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return attempt > 0 or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def init_process_group() -> None:
    """Join the torchrun world with store keys private to this restart attempt.

    Under the c10d rendezvous the workers share the agent's TCPStore across restarts (TORCHELASTIC_USE_AGENT_STORE),
    and torch 2.13 adds no per-attempt prefix: after a restart, ``new_group`` (DeepSpeed creates several) reads the
    dead workers' gloo addresses and fails with "connectFullMesh ... Connection refused". Prefixing the store with
    the attempt number gives every attempt fresh keys; pretrain's ``init_distributed`` then finds the group ready.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return  # not under an elastic agent's store: pretrain's own env:// initialisation is correct
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=30)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"/medfm/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def main(argv=None) -> int:
    from medfm.pretrain import preemption

    preemption.install()  # first thing: SLURM's SIGUSR1 / SIGTERM from now on mean "checkpoint and stop"
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m medfm.launch.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    from medfm.pretrain.config import load_run_config
    from medfm.schema import ConfigError

    config, overrides = argv[0], argv[1:]
    try:
        cfg = load_run_config(config, overrides)  # the one parse on this rank: the launcher's resolved file
    except ConfigError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    latest = _latest_step(ckpt_root)
    # (pretrain writes the config it ran back to config.yaml, so after one resume the file itself says "latest")
    if latest is not None and (cfg.checkpoint.resume == "latest" or (cfg.checkpoint.resume == "" and _restarted())):
        cfg.checkpoint.resume = "latest"
        if os.environ.get("RANK", "0") == "0":
            print(f"medfm launch: attempt {attempt}: resuming from {ckpt_root}/step{latest}", file=sys.stderr,
                  flush=True)
    from medfm.pretrain.faults import ENV, parse_faults

    try:
        parse_faults(os.environ.get(ENV, ""))
    except ValueError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    init_process_group()
    from medfm.launch.errors import exit_code
    from medfm.pretrain import collectives
    from medfm.pretrain.cli import train_and_report

    try:
        return exit_code(train_and_report, cfg)
    finally:
        collectives.shutdown()


if __name__ == "__main__":
    from medfm.pretrain import collectives

    collectives.leave(main())  # no interpreter teardown after the run (collectives.leave says why)
