"""One shard sample: the in-memory :class:`Sample`, its WebDataset member encoding, and strict decoding.

Decoding is the single place that says what a valid sample is (docs/INTERFACES.md), so the writer (before it
writes), ``medfm shards verify`` and the streaming loader all reject the same things with the same short reason
strings. Arrays travel as ``.npy`` and are loaded with ``allow_pickle=False``: a shard can never execute code.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfm.shards.manifest import EHR_COLUMNS, MEMBER_NAMES, META_MEMBER, MODALITIES, SCHEMA_VERSION, SPLITS

# Stable reasons (used as counters in verify/inspect/loader). Keep them short and never rename one.
REASONS = (
    "bad_key",           # empty key, or contains '.', '/' or whitespace
    "missing_meta",      # no meta.json member
    "bad_meta",          # meta.json not JSON / not an object / a required field missing or wrong
    "bad_schema",        # meta.schema is not the version this code reads
    "missing_member",    # meta lists a modality whose member is absent (or a member is present but not listed)
    "unknown_modality",  # a member or meta modality that the schema does not define
    "bad_npy",           # a .npy member that does not parse (truncated, pickled/object array, ...)
    "bad_dtype",         # array dtype not allowed for that modality
    "bad_shape",         # array rank/shape not allowed, or not matching meta
    "nonfinite",         # NaN/Inf in a float array
    "bad_text",          # text member not UTF-8
)

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_ALLOWED_DTYPES = {
    "image": (np.uint8, np.uint16),
    "volume": (np.int16, np.float16, np.float32),
    "signal": (np.float32, np.float16),
    "ehr": (np.float32,),
}
_PHOTOMETRIC = {1: "MONOCHROME2", 3: "RGB"}


class SampleError(ValueError):
    """A sample that does not satisfy the schema. ``reason`` is one of REASONS, ``message`` the detail."""

    def __init__(self, reason: str, message: str = "", key: str | None = None):
        self.reason = reason
        self.message = message
        self.key = key
        super().__init__(f"{key + ': ' if key else ''}{reason}{': ' + message if message else ''}")


@dataclass
class Sample:
    """One study (or record / patient sequence) with the modalities it has; absent ones are None."""

    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None
    volume: np.ndarray | None = None
    signal: np.ndarray | None = None
    ehr: np.ndarray | None = None
    text: str | None = None

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]


def make_meta(*, patient_id: str, study_id: str, split: str, source: dict, modalities=(), **extra) -> dict:
    """A meta.json dict with the required fields filled; ``extra`` adds preprocessing/labels/per-modality blocks."""
    meta = {"schema": SCHEMA_VERSION, "modalities": list(modalities), "patient_id": patient_id,
            "study_id": study_id, "split": split, "source": dict(source), "preprocessing": {}, "labels": {}}
    meta.update(extra)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# encoding


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON-serialisable")


def encode_meta(meta: dict) -> bytes:
    # sort_keys + fixed separators: identical input gives identical bytes (deterministic shards and checksums).
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default, allow_nan=False).encode("utf-8")


def encode_sample(sample: Sample) -> dict[str, Any]:
    """WebDataset member dict ``{"__key__": key, "meta.json": bytes, "<modality>.npy": bytes, "text.txt": bytes}``.

    ``meta["modalities"]`` is set from the arrays present; the result is validated with :func:`decode_sample`
    so a writer can never produce a sample a reader would reject.
    """
    meta = dict(sample.meta)
    meta.setdefault("schema", SCHEMA_VERSION)
    meta["modalities"] = sample.modalities
    members: dict[str, Any] = {"__key__": sample.key}
    try:
        members[META_MEMBER] = encode_meta(meta)
    except (TypeError, ValueError) as exc:
        raise SampleError("bad_meta", str(exc), sample.key) from None
    for m in ("image", "volume", "signal", "ehr"):
        arr = getattr(sample, m)
        if arr is not None:
            arr = np.asarray(arr)
            if arr.dtype == object:
                raise SampleError("bad_dtype", f"{m} is an object array", sample.key)
            members[MEMBER_NAMES[m]] = _npy_bytes(arr)
    if sample.text is not None:
        members[MEMBER_NAMES["text"]] = sample.text.encode("utf-8")
    decode_sample(members)  # raises SampleError if anything is off
    return members


# ---------------------------------------------------------------------------------------------------------------
# decoding + validation


def load_npy(data: bytes, key: str | None = None, member: str = "") -> np.ndarray:
    """``np.load`` of untrusted bytes: no pickle, and truncation/garbage become SampleError('bad_npy')."""
    try:
        arr = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError variously for bad input
        raise SampleError("bad_npy", f"{member}: {exc.__class__.__name__}: {exc}", key) from None
    if not isinstance(arr, np.ndarray):
        raise SampleError("bad_npy", f"{member}: not a single array", key)
    return arr


def _check_finite(arr: np.ndarray, name: str, key):
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise SampleError("nonfinite", f"{name} has NaN/Inf", key)


def _meta_block(meta: dict, name: str, key) -> dict:
    block = meta.get(name)
    if not isinstance(block, dict):
        raise SampleError("bad_meta", f"meta.{name} missing or not an object", key)
    return block


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _validate_image(arr, meta, key):
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise SampleError("bad_shape", f"image must be HxWxC with C in (1, 3), got {list(arr.shape)}", key)
    block = _meta_block(meta, "image", key)
    if list(block.get("shape", [])) != list(arr.shape):
        raise SampleError("bad_shape", f"meta.image.shape {block.get('shape')} != array {list(arr.shape)}", key)
    if block.get("photometric") not in ("MONOCHROME2", "RGB") or block["photometric"] != _PHOTOMETRIC[arr.shape[2]]:
        raise SampleError("bad_meta", f"meta.image.photometric {block.get('photometric')!r} does not fit C={arr.shape[2]}",
                          key)
    bits = 8 if arr.dtype == np.uint8 else 16
    if block.get("bits") != bits:
        raise SampleError("bad_meta", f"meta.image.bits {block.get('bits')!r} != {bits} of dtype {arr.dtype}", key)


def _validate_volume(arr, meta, key):
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise SampleError("bad_shape", f"volume must be DxHxW, got {list(arr.shape)}", key)
    block = _meta_block(meta, "volume", key)
    if list(block.get("shape", [])) != list(arr.shape):
        raise SampleError("bad_shape", f"meta.volume.shape {block.get('shape')} != array {list(arr.shape)}", key)
    spacing = block.get("spacing")
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(_positive_number(s) for s in spacing)):
        raise SampleError("bad_meta", f"meta.volume.spacing must be 3 positive numbers, got {spacing!r}", key)
    if block.get("units") not in ("HU", "normalized"):
        raise SampleError("bad_meta", f"meta.volume.units must be HU|normalized, got {block.get('units')!r}", key)
    if block["units"] == "HU" and arr.dtype != np.int16:
        raise SampleError("bad_dtype", f"HU volumes are int16, got {arr.dtype}", key)


def _validate_signal(arr, meta, key):
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise SampleError("bad_shape", f"signal must be leads x samples, got {list(arr.shape)}", key)
    block = _meta_block(meta, "signal", key)
    if not _positive_number(block.get("fs")):
        raise SampleError("bad_meta", f"meta.signal.fs must be a positive number, got {block.get('fs')!r}", key)
    leads = block.get("leads")
    if not (isinstance(leads, list) and len(leads) == arr.shape[0]):
        raise SampleError("bad_shape", f"meta.signal.leads has {len(leads) if isinstance(leads, list) else leads!r} "
                          f"names for {arr.shape[0]} leads", key)
    units = block.get("units")
    if units is not None and not (isinstance(units, list) and len(units) == arr.shape[0]):
        raise SampleError("bad_meta", "meta.signal.units must list one unit per lead", key)


def _validate_ehr(arr, meta, key):
    if arr.ndim != 2 or arr.shape[1] != len(EHR_COLUMNS):
        raise SampleError("bad_shape", f"ehr must be [n_events, {len(EHR_COLUMNS)}], got {list(arr.shape)}", key)
    block = _meta_block(meta, "ehr", key)
    if not isinstance(block.get("vocab"), str):
        raise SampleError("bad_meta", "meta.ehr.vocab must name a manifest vocabulary", key)
    codes = arr[:, 1]
    if arr.shape[0] and (codes.min() < 0 or not np.all(codes == np.round(codes))):
        raise SampleError("bad_shape", "ehr code ids must be non-negative integers", key)
    if arr.shape[0] and not np.isin(arr[:, 3], (0.0, 1.0)).all():
        raise SampleError("bad_shape", "ehr has_value column must be 0/1", key)


_VALIDATORS = {"image": _validate_image, "volume": _validate_volume, "signal": _validate_signal, "ehr": _validate_ehr}


def decode_meta(data, key=None) -> dict:
    try:
        meta = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("bad_meta", f"meta.json is not UTF-8 JSON ({exc.__class__.__name__})", key) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_meta", "meta.json is not an object", key)
    return meta


def validate_meta(meta: dict, key=None) -> list[str]:
    """Check the required meta fields; returns the declared modality list."""
    if meta.get("schema") != SCHEMA_VERSION:
        raise SampleError("bad_schema", f"meta.schema {meta.get('schema')!r} != {SCHEMA_VERSION}", key)
    mods = meta.get("modalities")
    if not isinstance(mods, list) or not mods:
        raise SampleError("bad_meta", "meta.modalities must be a non-empty list", key)
    for m in mods:
        if m not in MODALITIES:
            raise SampleError("unknown_modality", f"meta.modalities has {m!r}", key)
    for field_name in ("patient_id", "study_id"):
        if not isinstance(meta.get(field_name), str) or not meta[field_name]:
            raise SampleError("bad_meta", f"meta.{field_name} must be a non-empty string", key)
    if meta.get("split") not in SPLITS:
        raise SampleError("bad_meta", f"meta.split must be one of {list(SPLITS)}, got {meta.get('split')!r}", key)
    if not isinstance(meta.get("source"), dict) or not isinstance(meta["source"].get("format"), str):
        raise SampleError("bad_meta", "meta.source.format missing", key)
    return mods


def decode_sample(members: dict) -> Sample:
    """Validate a WebDataset member dict (bytes values; ``__key__`` etc. ignored) and return the Sample.

    Raises SampleError with a stable ``reason`` on the first problem found.
    """
    key = members.get("__key__")
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SampleError("bad_key", f"key {key!r} must be non-empty [A-Za-z0-9_-]", key if isinstance(key, str) else None)
    if META_MEMBER not in members:
        raise SampleError("missing_meta", "", key)
    meta = decode_meta(members[META_MEMBER], key)
    mods = validate_meta(meta, key)
    by_member = {v: k for k, v in MEMBER_NAMES.items()}
    present = set()
    for name in members:
        if name.startswith("__") or name == META_MEMBER:
            continue
        if name not in by_member:
            raise SampleError("unknown_modality", f"member {name!r}", key)
        present.add(by_member[name])
    if present != set(mods):
        missing = sorted(set(mods) - present) or sorted(present - set(mods))
        raise SampleError("missing_member", f"meta.modalities {mods} vs members {sorted(present)} ({missing[0]})", key)
    sample = Sample(key=key, meta=meta)
    for m in mods:
        raw = members[MEMBER_NAMES[m]]
        if m == "text":
            try:
                sample.text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                raise SampleError("bad_text", "text.txt is not UTF-8", key) from None
            continue
        arr = load_npy(raw, key, MEMBER_NAMES[m])
        if arr.dtype.type not in _ALLOWED_DTYPES[m]:
            allowed = [np.dtype(t).name for t in _ALLOWED_DTYPES[m]]
            raise SampleError("bad_dtype", f"{m} dtype {arr.dtype} not in {allowed}", key)
        _check_finite(arr, m, key)
        _VALIDATORS[m](arr, meta, key)
        setattr(sample, m, arr)
    return sample
