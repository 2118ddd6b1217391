"""Write validated samples into size-limited WebDataset tars plus ``manifest.json``.

Guarantees the rest of medfm relies on:
- a tar only ever appears under its final name when it is complete (written as ``.tmp``, fsynced, renamed), so a
  crash leaves no half-written shard a reader could pick up;
- tar headers carry no wall-clock time, user or host names, so the same samples give byte-identical shards (and
  checksums) on every machine;
- the manifest is replaced atomically and lists every shard's sample counts per modality and split, bytes and
  sha256, plus what was skipped and why.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from medfm.schema.atomic import atomic_open, commit_file
from medfm.shards.manifest import (
    MANIFEST_NAME,
    META_MEMBER,
    MODALITIES,
    SCHEMA_VERSION,
    SPLITS,
    shard_name,
)
from medfm.shards.sample import Sample, decode_meta, decode_sample, encode_sample

_MEMBER_ORDER = [META_MEMBER] + [f"{m}.npy" for m in MODALITIES if m != "text"] + ["text.txt"]
_TAR_BLOCK = 512


def _tar_size(n: int) -> int:
    """Bytes a member of ``n`` bytes occupies in a tar (header + data padded to 512)."""
    return _TAR_BLOCK + (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path, obj) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def member_checksums(members, names) -> dict[str, list[int]]:
    """``{member: [bytes, crc32]}`` of one sample: what the loader compares every read against (manifest.py)."""
    return {n: [len(members[n]), zlib.crc32(bytes(members[n]))] for n in names}


class DatasetWriter:
    """Append samples to ``out_dir/<prefix>-%06d.tar``; ``close()`` writes ``manifest.json`` and returns it.

    A new shard starts when the current one holds ``max_samples`` samples or adding the next sample would pass
    ``max_bytes`` (a single sample larger than ``max_bytes`` gets a shard of its own). ``overwrite=False`` refuses a
    directory that already holds a manifest or shards of this prefix, so nothing written before is lost by accident.
    """

    def __init__(self, out_dir, prefix: str = "shard", max_samples: int = 1000, max_bytes: int = 256 << 20,
                 overwrite: bool = False):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples and max_bytes must be >= 1, got {max_samples}, {max_bytes}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"prefix {prefix!r} must be a plain name without '.' or '/'")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_samples = int(max_samples)
        self.max_bytes = int(max_bytes)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar")) + sorted(self.out_dir.glob(MANIFEST_NAME))
        if existing:
            if not overwrite:
                raise FileExistsError(f"{self.out_dir}: already holds {existing[0].name} (use a new directory or "
                                      "overwrite)")
            for p in existing:
                p.unlink()
        for stale in self.out_dir.glob(f"{prefix}-*.tar.tmp"):  # leftovers of a crashed run
            stale.unlink()
        self.shards: list[dict] = []
        self.skipped: list[dict] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._cur: dict | None = None
        self._closed = False
        self._totals = {"samples": 0, "splits": Counter(), "modalities": Counter(),
                        "split_modalities": {s: Counter() for s in SPLITS}, "patients": {s: set() for s in SPLITS}}

    # -- shard lifecycle -------------------------------------------------------------------------------------
    def _open_shard(self):
        index = len(self.shards)
        name = shard_name(self.prefix, index)
        tmp = self.out_dir / (name + ".tmp")
        self._file = open(tmp, "wb")
        # USTAR: no pax headers (which would carry mtime/atime); member names are short.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._cur = {"name": name, "samples": 0, "bytes": 2 * _TAR_BLOCK,
                     "modalities": Counter(), "splits": Counter(), "members": [], "_tmp": tmp}

    def _finish_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        cur = self._cur
        final = commit_file(cur.pop("_tmp"), self.out_dir / cur["name"])
        cur["bytes"] = final.stat().st_size
        cur["sha256"] = sha256_file(final)
        cur["modalities"] = {m: cur["modalities"][m] for m in MODALITIES if cur["modalities"][m]}
        cur["splits"] = {s: cur["splits"][s] for s in SPLITS if cur["splits"][s]}
        self.shards.append(cur)
        self._tar = self._file = self._cur = None

    def _add_member(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    # -- public --------------------------------------------------------------------------------------------------
    def add(self, sample: Sample | dict) -> None:
        """Write one sample (a Sample, or a member dict from :func:`encode_sample`); validates before writing."""
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        if isinstance(sample, Sample):
            members = encode_sample(sample)  # validates
        else:
            members = sample
            decode_sample(members)
        key = members["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        meta = decode_meta(members[META_MEMBER], key)
        names = sorted((n for n in members if not n.startswith("__")),
                       key=lambda n: _MEMBER_ORDER.index(n) if n in _MEMBER_ORDER else len(_MEMBER_ORDER))
        size = sum(_tar_size(len(members[n])) for n in names)
        if self._cur is not None and (self._cur["samples"] >= self.max_samples
                                      or self._cur["bytes"] + size > self.max_bytes):
            self._finish_shard()
        if self._cur is None:
            self._open_shard()
        for n in names:
            self._add_member(f"{key}.{n}", bytes(members[n]))
        self._keys.add(key)
        cur = self._cur
        cur["members"].append(member_checksums(members, names))
        cur["samples"] += 1
        cur["bytes"] += size
        for m in meta["modalities"]:
            cur["modalities"][m] += 1
        cur["splits"][meta["split"]] += 1
        self._totals_add(meta)

    def skip(self, source: str, reason: str, message: str = "") -> None:
        """Record an input that was not written (counted by reason in the manifest)."""
        self.skipped.append({"source": str(source), "reason": str(reason), "message": str(message)})

    def _totals_add(self, meta):
        t = self._totals
        t["samples"] += 1
        t["splits"][meta["split"]] += 1
        for m in meta["modalities"]:
            t["modalities"][m] += 1
            t["split_modalities"][meta["split"]][m] += 1
        t["patients"][meta["split"]].add(meta["patient_id"])

    def totals(self) -> dict:
        t = self._totals
        return {
            "samples": t["samples"],
            "splits": {s: t["splits"][s] for s in SPLITS if t["splits"][s]},
            "modalities": {m: t["modalities"][m] for m in MODALITIES if t["modalities"][m]},
            "split_modalities": {s: {m: c[m] for m in MODALITIES if c[m]}
                                 for s, c in t["split_modalities"].items() if sum(c.values())},
            "patients": {s: len(p) for s, p in t["patients"].items() if p},
        }

    def close(self, **manifest_fields: Any) -> dict:
        """Finish the open shard and write manifest.json (``manifest_fields`` add/override top-level fields:
        ``preprocessing``, ``deid``, ``vocabularies``, ``sources``, ``config``, ...). Returns the manifest."""
        if self._closed:
            raise RuntimeError("DatasetWriter is already closed")
        self._finish_shard()
        self._closed = True
        manifest = {
            "schema": SCHEMA_VERSION,
            "format": "webdataset",
            "prefix": self.prefix,
            "shards": self.shards,
            "totals": self.totals(),
            "skipped": dict(sorted(Counter(s["reason"] for s in self.skipped).items())),
            "skipped_inputs": self.skipped,
            "vocabularies": {},
            "preprocessing": {},
            "deid": {"applied": False, "profile": None},
            "limits": {"max_samples": self.max_samples, "max_bytes": self.max_bytes},
        }
        manifest.update(manifest_fields)
        write_json_atomic(self.out_dir / MANIFEST_NAME, manifest)
        return manifest

    def abort(self) -> None:
        """Drop the shard being written (its temp file); finished shards stay, no manifest is written."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._cur["_tmp"].unlink(missing_ok=True)
            self._tar = self._file = self._cur = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
        return False
