"""torch.distributed's ``env://`` world variables, and an environment for child processes without them.

``engine.init_distributed`` writes these into ``os.environ`` when a process trains alone (a world of one). A process
that then starts processes of its own (a sweep point, the GPU check's ``medfm eval``, a test's child) must not hand
them down: the child would join the parent's world, or try to listen on the port the parent's store already holds
(EADDRINUSE). torchrun sets its own values for its workers, so stripping them is always safe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

WORLD_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_outside_world(env: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) without the world variables, with ``extra`` set on top."""
    base = os.environ if env is None else env
    return {**{k: v for k, v in base.items() if k not in WORLD_ENV}, **extra}
