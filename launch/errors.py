"""Failures every ``medfm`` command reports as one line (exit 1) instead of a traceback: the work could not write
its output (read-only directory, disk full, no permission), refused a checkpoint that needs unpickling, or found a
bad shard before training."""

from __future__ import annotations

import errno
import pickle

# errno of a failed write: no permission, read-only filesystem, disk or quota full, file too large, a path
# component that is a file.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR}


def one_line(exc: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which keeps its traceback)."""
    from medfm.shards.preflight import ShardCheckError

    if isinstance(exc, ShardCheckError):  # a shard failed the check before step 1 (the work's finding)
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        path = exc.filename or "(unknown path)"
        return f"cannot write {path}: {exc.strerror or exc}"
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower().replace(" ", "_"):
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return f"checkpoint refused (it needs unpickling arbitrary objects; medfm loads weights only): {first}"
    return None
