"""The loader's cheap check before step 1: every shard it will read exists, has the size the manifest recorded, and
starts with a valid tar header. One ``stat`` and one 512-byte read per shard; no full read (``medfm shards verify``
does that).

Why before step 1: the loader replaces unreadable samples (corrupt.py) so step counts never change, which would
otherwise let a deleted, truncated or garbage shard silently drop its samples from training. A problem here is an
error naming the shard (``ShardCheckError``, exit 1), or, with ``data.on_missing_shard: skip``, a counted loss:
the shard is left out of the sample table and its samples are reported per source and reason.

Remote sources (URL templates) are not checked here (a check would stream them); their faults are counted at read
time like any other bad read.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass

from medfm.shards.stream import is_local, local_path

# Reasons a shard fails the check (also the keys of the per-source loss counts).
CHECK_REASONS = ("missing_shard", "size_mismatch", "unreadable_shard")


class ShardCheckError(RuntimeError):
    """A shard the loader would read is missing, has the wrong size, or is not a tar (exit 1, one line)."""


@dataclass
class ShardProblem:
    name: str       # shard file name in the manifest
    reason: str     # one of CHECK_REASONS
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason} ({self.message})"


def check_shard(url: str, shard: Mapping) -> ShardProblem | None:
    """None if the local shard at ``url`` looks like what the manifest recorded; a ShardProblem otherwise."""
    if not is_local(url):
        return None
    path = local_path(url)
    name = shard["name"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return ShardProblem(name, "missing_shard", f"{path}: no such file")
    except OSError as exc:
        return ShardProblem(name, "unreadable_shard", f"{path}: {exc.__class__.__name__}: {exc}")
    if size != int(shard["bytes"]):
        return ShardProblem(name, "size_mismatch", f"{path}: {size} bytes, manifest says {shard['bytes']}")
    try:
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, OSError) as exc:
        return ShardProblem(name, "unreadable_shard", f"{path}: first tar header invalid ({exc})")
    return None
