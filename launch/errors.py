"""Failures every ``medfm`` command reports as one line (exit 1) instead of a traceback: the work could not write
its output (read-only directory, disk full, no permission), refused a checkpoint that needs unpickling, or found a
bad shard before training."""

from __future__ import annotations

import errno
import pickle
import sys

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


def exit_code(fn, *args) -> int:
    """``fn(*args)`` as a ``medfm`` command's exit code: a ConfigError is one line and 2, an expected failure
    (``one_line``) one line and 1; a bug keeps its traceback. (``medfm launch``'s workers call pretrain through it,
    exactly as the ``medfm`` CLI maps a command's errors.)"""
    from medfm.schema import ConfigError

    try:
        return int(fn(*args) or 0)
    except ConfigError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        msg = one_line(exc)
        if msg is None:
            raise
        print(f"medfm: error: {msg}", file=sys.stderr)
        return 1
