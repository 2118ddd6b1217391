"""The evaluation side of a shard directory: every sample of one split exactly once, in a fixed order, with its
metadata, plus label extraction from ``meta.labels`` as the suite's task declares it.

The sample table comes from medfm.shards.loader.resolve_source (the same one training uses), but evaluation does not
shuffle, resample or drop: it must see each sample once, so it reads the table in order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.evals.protocols.base import ProtocolError


@dataclass
class SplitIndex:
    """Samples of one split of one shard directory: ``urls[shard[i]]`` sample ``index[i]``, key and meta."""

    directory: str
    split: str
    urls: list[str]
    shard: np.ndarray
    index: np.ndarray
    keys: list[str]
    metas: list[dict]
    manifest_hash: str

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def patients(self) -> np.ndarray:
        return np.array([str(m.get("patient_id", k)) for k, m in zip(self.keys, self.metas)])


def manifest_hash(directory) -> str:
    """sha256 of the manifest bytes: changes whenever any shard's content (its sha256) changes."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ProtocolError(f"{directory}: no manifest.json (is it a medfm shard directory?)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def index_split(directory, split: str) -> SplitIndex:
    """Table of the split's samples with their meta.json (reads only the meta member of each sample)."""
    from medfm.shards.loader import SourceConfig, resolve_source
    from medfm.shards.manifest import ManifestError
    from medfm.shards.stream import ShardReader

    reader = ShardReader()
    try:
        src = resolve_source(SourceConfig(path=str(directory)), split, reader)
    except ManifestError as exc:
        raise ProtocolError(str(exc)) from None
    keys, metas = [], []
    for s, i in zip(src.shard.tolist(), src.index.tolist()):
        members = reader.read(src.urls[s], i, only=("meta.json",))
        keys.append(members["__key__"])
        metas.append(json.loads(members.get("meta.json", b"{}")))
    reader.close()
    return SplitIndex(str(directory), split, src.urls, src.shard, src.index, keys, metas, manifest_hash(directory))


def read_samples(index: SplitIndex, positions, reader=None) -> list:
    """Decoded :class:`medfm.shards.sample.Sample` objects at ``positions`` of the table."""
    from medfm.shards.sample import decode_sample
    from medfm.shards.stream import ShardReader

    own = reader is None
    reader = reader or ShardReader()
    out = [decode_sample(reader.read(index.urls[int(index.shard[p])], int(index.index[p]))) for p in positions]
    if own:
        reader.close()
    return out


# ----------------------------------------------------------------------------------------------------- labels
@dataclass
class LabelSpec:
    """How a task reads its target from ``meta.labels``.

    binary / multiclass / ordinal: ``field`` holds a class name (one of ``classes``) or a class id.
    multilabel: ``fields`` are 0/1 findings. survival: ``field`` is the time and ``event_field`` the 0/1 event.
    """

    task: str
    kind: str
    field: str = ""
    fields: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    event_field: str = ""
    drop_missing: bool = False  # skip samples without the label instead of failing the task

    @property
    def class_names(self) -> list[str]:
        if self.kind == "multilabel":
            return list(self.fields)
        if self.kind == "survival":
            return []
        return list(self.classes) if self.classes else ["negative", "positive"]


def _class_id(spec: LabelSpec, value, key: str, split: str) -> int:
    names = spec.class_names
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        raise ProtocolError(f"task {spec.task}: {split} sample {key} has {spec.field}={value!r}, not one of "
                            f"classes {names}")
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(names):
        return int(value)
    raise ProtocolError(f"task {spec.task}: {split} sample {key} has {spec.field}={value!r}; expected a class "
                        f"name in {names} or an id in [0, {len(names)})")


def extract_labels(spec: LabelSpec, index: SplitIndex) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(y, event or None, kept positions). Missing labels fail the task naming the first key, unless drop_missing."""
    needed = {"multilabel": list(spec.fields), "survival": [spec.field, spec.event_field]}.get(spec.kind, [spec.field])
    if not all(needed):
        raise ProtocolError(f"task {spec.task}: the label field(s) for a {spec.kind} task are not set")
    keep, missing = [], []
    for pos, meta in enumerate(index.metas):
        labels = meta.get("labels") or {}
        absent = [f for f in needed if labels.get(f) is None]
        (missing if absent else keep).append((pos, absent) if absent else pos)
    if missing and not spec.drop_missing:
        pos, absent = missing[0]
        raise ProtocolError(f"task {spec.task}: {len(missing)} of {len(index)} {index.split} samples lack label "
                            f"{absent[0]!r} (first: {index.keys[pos]}); set drop_missing: true to skip them")
    keep = np.asarray(keep, dtype=np.int64)
    metas = [index.metas[p]["labels"] for p in keep]
    keys = [index.keys[p] for p in keep]
    event = None
    if spec.kind == "multilabel":
        y = np.array([[int(bool(m[f])) for f in spec.fields] for m in metas], dtype=np.int64).reshape(-1,
                                                                                                      len(spec.fields))
    elif spec.kind == "survival":
        y = np.array([float(m[spec.field]) for m in metas], dtype=np.float64)
        event = np.array([int(bool(m[spec.event_field])) for m in metas], dtype=np.int64)
    else:
        y = np.array([_class_id(spec, m[spec.field], k, index.split) for m, k in zip(metas, keys)], dtype=np.int64)
    return y, event, keep
