"""Atomic file writes: a file appears under its final name only when it is complete.

Every part writes files that a crash, a kill or a full disk must never leave torn (manifests, checkpoint markers,
config.yaml, the zoo index, eval reports, feature caches, sweep results). The recipe is always the same: write a
temporary file in the same directory (so the rename stays on one file system), fsync it, ``os.replace`` it onto the
final name (atomic on POSIX), fsync the directory (so the rename itself survives a power loss). On failure the
temporary file is removed and the previous file, if any, is untouched.

It lives in ``medfm.schema`` because that is the one package below every part (it imports nothing of medfm but the recipe lookup of medfm.configs), and
shards / model_zoo may not import training code.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path


def _tmp_path(path: Path) -> Path:
    # Unique per host, process and thread: several nodes of a shared file system (whose pids may coincide), or a
    # sweep's threads, may write the same file at once; each gets its own temporary and the last rename wins with a
    # complete file.
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened read-only (some network file systems): rename still holds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(tmp, path) -> Path:
    """fsync the finished file ``tmp`` and rename it onto ``path`` (for writers that stream into their own
    temporary, e.g. a shard tar)."""
    tmp, path = Path(tmp), Path(path)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` for a library that writes by file name (safetensors ``save_file``,
    ``torch.save``); when the block completes it is committed onto ``path``, when it raises it is removed."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        yield tmp
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **open_kwargs):
    """``open(path, mode)`` for writing whose content replaces ``path`` only when the block completes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open: mode must be a write mode ('w', 'wb'), got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def atomic_write(path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically; returns ``path``."""
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as f:
            f.write(data)
    else:
        with atomic_open(path, "w", encoding=encoding) as f:
            f.write(data)
    return Path(path)
