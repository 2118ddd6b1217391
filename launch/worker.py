"""The torchrun entry point of ``medfm launch``: one worker = one ``medfm pretrain`` rank.

``python -m medfm.launch.worker CONFIG [key=value ...]``

Why a wrapper and not ``medfm pretrain`` directly: torchrun restarts the *same* command after a failure, but the
restarted attempt must resume from the newest complete checkpoint while the first attempt of a fresh run must not
(``checkpoint.resume=latest`` fails when there is none). The wrapper decides per attempt, then runs ``medfm pretrain``
in this process. Resuming restores the loader state and RNG with the weights, so no sample is lost or repeated.

Fault injection for the restart tests (never set in normal runs): ``MEDFM_FAULT=MODE:STEP[:RANK[:ATTEMPT]]``, several
separated by commas; a fault fires only in the worker of that global rank (default 0) during that restart attempt
(TORCHELASTIC_RESTART_COUNT, default 0), so a restarted worker does not fire it again:

* ``kill-after-checkpoint:S`` — SIGKILL this worker right after checkpoint S is complete ("latest" moved), before
  step S+1 trains.
* ``kill-in-save:S`` — SIGKILL this worker in the middle of saving checkpoint S: after its DeepSpeed partitions are
  written, before its client state and before the checkpoint is marked complete.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _latest_step(ckpt_root: Path) -> int | None:
    from medfm.pretrain.checkpoint import TAG_RE, CheckpointManager

    tag = CheckpointManager(ckpt_root, 1, 0, 1).latest()
    return int(TAG_RE.match(tag).group(1)) if tag else None


def _kill_self(reason: str) -> None:
    print(f"medfm fault injection: {reason}; SIGKILL rank {os.environ.get('RANK')} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults(specs: str) -> None:
    for spec in specs.split(","):
        if spec.strip():
            install_fault(spec.strip())


def install_fault(spec: str) -> None:
    """Arm one fault of ``MEDFM_FAULT`` (see the module docstring); a malformed spec is an error."""
    parts = spec.split(":")
    if len(parts) not in (2, 3, 4) or not all(p.isdigit() for p in parts[1:]):
        raise SystemExit(f"MEDFM_FAULT={spec!r}: expected MODE:STEP[:RANK[:ATTEMPT]]")
    mode, step = parts[0], int(parts[1])
    rank = int(parts[2]) if len(parts) > 2 else 0
    attempt = int(parts[3]) if len(parts) > 3 else 0
    if mode not in ("kill-after-checkpoint", "kill-in-save"):
        raise SystemExit(f"MEDFM_FAULT={spec!r}: unknown mode {mode!r} (kill-after-checkpoint | kill-in-save)")
    if (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != attempt
            or int(os.environ.get("RANK", "0")) != rank):
        return
    import medfm.pretrain.checkpoint as ck

    if mode == "kill-after-checkpoint":
        # Wrapping the save (not polling "latest") makes the kill land exactly between step S and S+1.
        original_save = ck.CheckpointManager.save

        def save(self, engine, at_step, client):
            tag = original_save(self, engine, at_step, client)
            if at_step >= step:
                _kill_self(f"checkpoint step{at_step} complete")
            return tag

        ck.CheckpointManager.save = save
    else:  # kill-in-save
        original = ck._write_json_atomic
        target = f"step{step}"

        def write(path, data):
            p = Path(path)
            if p.parent.name == "client" and p.parent.parent.name == target:
                _kill_self(f"saving checkpoint {target}, partitions written, not complete")
            return original(path, data)

        ck._write_json_atomic = write


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m medfm.launch.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    from medfm.launch.cli import main as medfm_main
    from medfm.launch.resolve import resolve_config
    from medfm.schema import ConfigError

    config, overrides = argv[0], argv[1:]
    try:
        cfg = resolve_config(config, overrides)
    except ConfigError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    extra = []
    latest = _latest_step(ckpt_root)
    # (pretrain writes the config it ran back to config.yaml, so after one resume the file itself says "latest")
    if latest is not None and cfg.checkpoint.resume in ("", "latest"):
        extra = ["checkpoint.resume=latest"]
        if os.environ.get("RANK", "0") == "0":
            print(f"medfm launch: attempt {attempt}: resuming from {ckpt_root}/step{latest}", file=sys.stderr,
                  flush=True)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed's shared-memory comm op is a ~35 s C++ JIT build per process on CPU hosts; gloo does the same job.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    fault = os.environ.get("MEDFM_FAULT")
    if fault:
        install_faults(fault)
    init_process_group()
    return medfm_main(["pretrain", config, *overrides, *extra])


if __name__ == "__main__":
    sys.exit(main())
