"""The torchrun agent of a SLURM job: ``python -m medfm.launch.agent [torchrun args]`` = ``torchrun`` that ignores
SIGUSR1.

SLURM delivers a step signal (the batch script forwards the ``--signal=B:USR1@S`` warning through srun) to every
process of the step: the agent and its workers. torchrun does not handle SIGUSR1 by default, so the signal would kill
the agent and, with it, the workers before they checkpoint. Ignoring it here keeps the agent alive while the workers
(which install medfm.pretrain.preemption's handler when they start; until then the inherited "ignore" keeps them
alive too, and the batch script repeats the signal) finish their step, checkpoint and exit. SIGTERM keeps torchrun's
own handling: it passes the signal on to the workers and waits for them (``--shutdown-timeout``).
"""

from __future__ import annotations

import runpy
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.argv[0] = "torchrun"
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
