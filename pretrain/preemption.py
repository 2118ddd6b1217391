"""Stop a run cleanly on SLURM's warning signal or on preemption: finish the step, checkpoint, stop.

* ``SIGUSR1`` — the batch script's ``#SBATCH --signal=B:USR1@S`` warning (the time limit is S seconds away) or a
  manual ``scancel --signal=USR1 --batch JOB``: checkpoint at the next step boundary, and rank 0 writes
  ``<run_dir>/requeue.json`` so the batch script (launch/slurm.py) runs ``scontrol requeue``; the requeued job
  resumes from that checkpoint (the launch worker adds ``checkpoint.resume=latest``) with the same sample order.
* ``SIGTERM`` — preemption, ``scancel``, or the time limit itself: checkpoint at the next step boundary if the grace
  (SLURM's KillWait, torchrun's shutdown timeout) allows, and stop without asking for a requeue: SLURM requeues a
  job it preempts itself (``PreemptMode=REQUEUE``), and a cancelled job must stay cancelled.

The handlers only record the signal. The training loop asks at every step boundary, and all ranks agree through one
``any_flags`` (a signal that reached one rank stops every rank after the same step, so the ZeRO-3 save is
collective and consistent). A second signal changes nothing (SLURM and torchrun may both deliver one); a process
stuck inside a collective is ended by their SIGKILL escalation, as before.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import time
from pathlib import Path

from medfm.pretrain import collectives
from medfm.schema.atomic import atomic_write

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_SIGNALS = (signal.SIGUSR1,)
MARKER = "requeue.json"  # in the run directory; read (and removed) by the SLURM batch script

_caught: list[int] = []


def _record(signum, _frame) -> None:
    _caught.append(signum)


def _ignore_late_warnings() -> None:
    # Python's finalisation resets Python-level handlers to SIG_DFL, and SIGUSR1's default action kills: a warning
    # repeated by the batch script while this process exits (after its checkpoint) would turn a clean exit into
    # "killed by SIGUSR1" (a failed worker to torchrun, which may restart the group). SIG_IGN survives finalisation.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def install() -> None:
    """Record STOP_SIGNALS from now on (idempotent; only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not _record:
            signal.signal(sig, _record)
    atexit.unregister(_ignore_late_warnings)
    atexit.register(_ignore_late_warnings)


def caught() -> list[int]:
    """The stop signals this process received so far (in order)."""
    return list(_caught)


class Preemption:
    """The training loop's view: ``stop_requested()`` at each step boundary, then ``checkpoint_and_stop``."""

    def __init__(self, run_dir, rank: int):
        install()
        self.marker = Path(run_dir) / MARKER
        self.rank = rank
        self.requeue = False

    def stop_requested(self) -> bool:
        """True on every rank when any rank received a stop signal (a collective: call it on all ranks)."""
        stop, requeue = collectives.any_flags([bool(_caught), any(s in REQUEUE_SIGNALS for s in _caught)])
        self.requeue = requeue
        return stop

    def checkpoint_and_stop(self, step: int, save, latest: str | None) -> str:
        """Save checkpoint ``step`` (unless it is already the latest), ask for a requeue on SIGUSR1; the message."""
        if latest != f"step{step}":
            save(step)
        name = "SIGUSR1" if self.requeue else "SIGTERM"
        if self.requeue and self.rank == 0:
            atomic_write(self.marker, json.dumps({"step": step, "signal": name,
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                  "job_id": os.environ.get("SLURM_JOB_ID")}) + "\n")
        _caught.clear()
        then = ("the SLURM batch script requeues the job, which resumes from it" if self.requeue
                else "resume with checkpoint.resume=latest")
        return f"stopped after step {step} on {name}: checkpoint step{step} written; {then}"
