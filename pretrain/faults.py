"""Fault injection for restart tests (never set in normal runs): ``MEDFM_FAULT=MODE:STEP[:RANK[:ATTEMPT]],...``.

The training loop and CheckpointManager call the hooks below at the exact points a real crash hurts most, so the
elastic tests (launch) kill a worker there without patching pretrain internals. A fault fires only in the process
of that global rank (default 0) during that restart attempt (``TORCHELASTIC_RESTART_COUNT``, default 0), so a
restarted worker does not fire it again:

* ``kill-after-checkpoint:S`` — SIGKILL right after checkpoint S (or the first one after S) is complete
  ("latest" moved), before step S+1 trains.
* ``kill-in-save:S`` — SIGKILL in the middle of saving checkpoint S: after this rank's model/optimizer partitions
  are written, before its client state and before the checkpoint is marked complete.
* ``kill-at-step:S`` — SIGKILL right after optimizer step S (logged, not checkpointed unless S is a checkpoint
  step): the restart replays the steps since the last checkpoint.
* ``abort-at-exit:S`` — after step S, arm an abort for interpreter teardown: what gloo's threads sometimes do to a
  worker whose run has finished ("terminate called without an active exception"), made deterministic.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

MODES = ("kill-after-checkpoint", "kill-in-save", "kill-at-step", "abort-at-exit")
ENV = "MEDFM_FAULT"


@dataclass(frozen=True)
class Fault:
    mode: str
    step: int
    rank: int = 0
    attempt: int = 0


def parse_faults(specs: str) -> list[Fault]:
    """``MODE:STEP[:RANK[:ATTEMPT]]`` items separated by commas -> faults (ValueError, one line, if malformed)."""
    out = []
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            continue
        parts = spec.split(":")
        if len(parts) not in (2, 3, 4) or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"{ENV}={spec!r}: expected MODE:STEP[:RANK[:ATTEMPT]] with integer STEP/RANK/ATTEMPT")
        if parts[0] not in MODES:
            raise ValueError(f"{ENV}={spec!r}: unknown mode {parts[0]!r} (expected one of {', '.join(MODES)})")
        out.append(Fault(parts[0], *(int(p) for p in parts[1:])))
    return out


def _kill_self(reason: str, rank: int) -> None:
    print(f"medfm fault injection: {reason}; SIGKILL rank {rank} (pid {os.getpid()})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector:
    """The faults armed for this process (rank, restart attempt); the hooks are no-ops when there are none."""

    def __init__(self, faults: list[Fault], rank: int, attempt: int = 0):
        self.rank = rank
        self.faults = [f for f in faults if f.rank == rank and f.attempt == attempt]

    @classmethod
    def from_env(cls, rank: int) -> FaultInjector:
        return cls(parse_faults(os.environ.get(ENV, "")), rank,
                   int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    def __bool__(self) -> bool:
        return bool(self.faults)

    def in_save(self, step: int) -> None:
        """Called by CheckpointManager.save between the partitions and the client state of checkpoint ``step``."""
        if any(f.mode == "kill-in-save" and f.step == step for f in self.faults):
            _kill_self(f"saving checkpoint step{step}, partitions written, not complete", self.rank)

    def after_checkpoint(self, step: int) -> None:
        """Called by the loop once checkpoint ``step`` is complete on every rank."""
        if any(f.mode == "kill-after-checkpoint" and step >= f.step for f in self.faults):
            _kill_self(f"checkpoint step{step} complete", self.rank)

    def at_step(self, step: int) -> None:
        """Called by the loop after optimizer step ``step`` is logged (before its checkpoint, if any)."""
        if any(f.mode == "kill-at-step" and f.step == step for f in self.faults):
            _kill_self(f"after step {step}", self.rank)
        if any(f.mode == "abort-at-exit" and f.step == step for f in self.faults):
            import atexit

            print(f"medfm fault injection: rank {self.rank} aborts at interpreter exit", file=sys.stderr, flush=True)
            atexit.register(os.abort)
