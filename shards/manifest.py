"""Dataset-level contract: schema constants, the manifest file, and patient-level split assignment.

A dataset directory holds ``<prefix>-%06d.tar`` shards plus ``manifest.json`` (written by
:class:`medfm.shards.writer.DatasetWriter`). Everything that reads shards (loader, evals, verify, inspect) starts
from :func:`load_manifest`, so the checks on the manifest's shape live here, once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

# The canonical modality order (every list of modalities is sorted by it), re-exported as part of the shard format.
from medfm.schema.modalities import MODALITIES  # noqa: F401

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
# Member file name per modality inside a sample.
MEMBER_NAMES = {"image": "image.npy", "volume": "volume.npy", "signal": "signal.npy", "ehr": "ehr.npy",
                "text": "text.txt"}
META_MEMBER = "meta.json"
# EHR array columns (float32 [n_events, 4]); MEDS source columns they come from are in readers/ehr.py.
EHR_COLUMNS = ("time", "code", "value", "has_value")
# Reserved ids of every EHR code vocabulary.
EHR_PAD, EHR_UNK = "<pad>", "<unk>"
DEFAULT_SPLIT_RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
SHARD_PATTERN = "{prefix}-{index:06d}.tar"


class ManifestError(ValueError):
    """manifest.json is missing, unreadable, or not the shape this version writes (one line, names the field)."""


def normalize_ratios(ratios: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
    """Split ratios as ``{"train": p, "val": p, "test": p}`` summing to 1 (a 3-sequence is read in SPLITS order)."""
    if ratios is None:
        return dict(DEFAULT_SPLIT_RATIOS)
    if isinstance(ratios, Mapping):
        unknown = set(ratios) - set(SPLITS)
        if unknown:
            raise ValueError(f"split ratios: unknown split {sorted(unknown)[0]!r} (expected {list(SPLITS)})")
        values = {s: float(ratios.get(s, 0.0)) for s in SPLITS}
    else:
        ratios = list(ratios)
        if len(ratios) != len(SPLITS):
            raise ValueError(f"split ratios: expected {len(SPLITS)} numbers (train, val, test), got {len(ratios)}")
        values = {s: float(r) for s, r in zip(SPLITS, ratios)}
    if any(v < 0 for v in values.values()):
        raise ValueError(f"split ratios: must be >= 0, got {values}")
    total = sum(values.values())
    if total <= 0:
        raise ValueError("split ratios: at least one must be > 0")
    return {s: v / total for s, v in values.items()}


def split_for(pseudo_patient_id: str, ratios=None, seed: int = 0) -> str:
    """The split of a patient: a pure function of (pseudonym, ratios, seed).

    Hash-based rather than random so that every worker, every re-run and every incremental build assigns the same
    patient to the same split without coordination; all samples of a patient therefore land in one split.
    """
    r = normalize_ratios(ratios)
    digest = hashlib.sha256(f"medfm-split:{int(seed)}:{pseudo_patient_id}".encode()).digest()
    u = struct.unpack(">Q", digest[:8])[0] / 2.0**64  # uniform in [0, 1)
    edge = 0.0
    for split in SPLITS:
        edge += r[split]
        if u < edge:
            return split
    return next(s for s in reversed(SPLITS) if r[s] > 0)  # float round-off at the top edge


def shard_name(prefix: str, index: int) -> str:
    return SHARD_PATTERN.format(prefix=prefix, index=index)


def _require(d: Mapping, key: str, kind, where: str):
    if key not in d:
        raise ManifestError(f"{where}: missing field '{key}'")
    if not isinstance(d[key], kind):
        raise ManifestError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}")
    return d[key]


def _check_members(shard: Mapping, where: str) -> None:
    """Optional per-sample member checksums (added after schema 1 shipped; older manifests have none): a list with
    one ``{member: [bytes, crc32]}`` per sample, in tar order. The loader compares every member it reads."""
    members = shard.get("members")
    if members is None:
        return
    if not isinstance(members, list) or len(members) != shard["samples"]:
        raise ManifestError(f"{where}: field 'members' should be a list of {shard['samples']} objects")
    for i, m in enumerate(members):
        if not isinstance(m, Mapping) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) for v in m.values()):
            raise ManifestError(f"{where}: members[{i}] should map member names to [bytes, crc32]")


def validate_manifest(manifest: Mapping, where: str = MANIFEST_NAME) -> None:
    """Structural check of a manifest dict; raises ManifestError naming the first bad field."""
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"{where}: expected a JSON object")
    schema = _require(manifest, "schema", int, where)
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema {schema} is not supported (this medfm reads schema {SCHEMA_VERSION})")
    shards = _require(manifest, "shards", list, where)
    for i, shard in enumerate(shards):
        w = f"{where}: shards[{i}]"
        if not isinstance(shard, Mapping):
            raise ManifestError(f"{w}: expected an object")
        name = _require(shard, "name", str, w)
        if "/" in name or name.startswith("."):
            raise ManifestError(f"{w}: name {name!r} must be a plain file name")
        _require(shard, "samples", int, w)
        _require(shard, "bytes", int, w)
        _require(shard, "sha256", str, w)
        _require(shard, "modalities", dict, w)
        _require(shard, "splits", dict, w)
        _check_members(shard, w)
    _require(manifest, "totals", dict, where)
    _require(manifest, "deid", dict, where)
    _require(manifest, "vocabularies", dict, where)


def load_manifest(directory) -> dict:
    """Read and validate ``<directory>/manifest.json``."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is {directory} a medfm shard directory?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    validate_manifest(manifest, str(path))
    return manifest


def shard_paths(directory, manifest: Mapping | None = None, split: str | None = None) -> list[Path]:
    """Paths of the shards listed in the manifest (optionally only those holding samples of ``split``)."""
    manifest = manifest if manifest is not None else load_manifest(directory)
    out = []
    for shard in manifest["shards"]:
        if split is not None and not shard["splits"].get(split):
            continue
        out.append(Path(directory) / shard["name"])
    return out
