"""``medfm shards merge PART_DIR... --out DIR``: the shard sets of ``medfm shards build --part I/N`` -> one set.

Each part was built on its own node from a deterministic 1/N of the inputs (``ingest.in_part``). Sample keys and
splits are functions of the pseudonyms (``ingest.sample_key``, ``manifest.split_for``), so they agree across parts
without any coordination; only EHR code ids are per part (each part numbers the codes it met). The merge copies
every sample into new shards, re-mapping ``ehr.npy`` code ids onto one merged vocabulary, and writes one manifest
whose counts are the parts' sums. Parts built with different settings (config other than ``part``, pseudonym salt
source, split rule) are refused: one line, exit 2.
"""

from __future__ import annotations

import io

import numpy as np

from medfm.schema import ConfigError
from medfm.shards.manifest import EHR_PAD, EHR_UNK, ManifestError, load_manifest, shard_paths
from medfm.shards.verify import iter_tar_samples
from medfm.shards.writer import DatasetWriter

# top-level manifest fields that must agree between parts (config minus its "part")
_SAME = ("schema", "deid", "identifiable", "preprocessing", "split", "prefix")


def _config_without_part(manifest: dict) -> dict:
    cfg = dict(manifest.get("config") or {})
    cfg.pop("part", None)
    return cfg


def _remap_ehr(data: bytes, mapping: np.ndarray) -> bytes:
    from medfm.shards.sample import load_npy

    arr = load_npy(data)
    if len(arr):
        arr = arr.copy()
        arr[:, 1] = mapping[arr[:, 1].astype(np.int64)]
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def _add_counts(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _add_counts(total.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v


def merge(part_dirs, out_dir, overwrite: bool = False, log=None) -> dict:
    """Merge part shard sets into ``out_dir``; returns the merged manifest (raises ConfigError on mismatch)."""
    log = log or (lambda msg: None)
    if not part_dirs:
        raise ConfigError("merge: name at least one part directory")
    manifests = []
    for d in part_dirs:
        try:
            manifests.append(load_manifest(d))
        except ManifestError as exc:
            raise ConfigError(str(exc)) from None
    first = manifests[0]
    for d, m in zip(part_dirs[1:], manifests[1:]):
        for key in _SAME:
            if m.get(key) != first.get(key):
                raise ConfigError(f"merge: {d} differs from {part_dirs[0]} in '{key}' (parts of one build only)")
        if _config_without_part(m) != _config_without_part(first):
            raise ConfigError(f"merge: {d} was built with other settings than {part_dirs[0]}")
    parts = [m.get("sources", {}).get("part", "") for m in manifests]
    if len(set(parts)) != len(parts):
        raise ConfigError(f"merge: the same part twice ({parts})")
    vocab = [EHR_PAD, EHR_UNK]
    ids = {c: i for i, c in enumerate(vocab)}
    limits = first.get("limits", {})
    try:
        writer = DatasetWriter(out_dir, first["prefix"], limits.get("max_samples", 1000),
                               limits.get("max_bytes", 256 << 20), overwrite=overwrite)
    except FileExistsError as exc:
        raise ConfigError(f"{exc}; pass --overwrite to replace it") from None
    try:
        for d, m in zip(part_dirs, manifests):
            codes = m.get("vocabularies", {}).get("ehr", [EHR_PAD, EHR_UNK])
            for c in codes:
                if c not in ids:
                    ids[c] = len(vocab)
                    vocab.append(c)
            mapping = np.array([ids[c] for c in codes], dtype=np.float32)
            for shard in shard_paths(d, m):
                for members in iter_tar_samples(shard):
                    if "ehr.npy" in members:
                        members["ehr.npy"] = _remap_ehr(members["ehr.npy"], mapping)
                    writer.add(members)
            for rec in m.get("skipped_inputs", []):
                writer.skip(rec["source"], rec["reason"], rec.get("message", ""))
            log(f"merged {d}: {m['totals']['samples']} samples")
    except BaseException:
        writer.abort()
        raise
    sources: dict = {}
    warnings: dict = {}
    labels = {"declared": first.get("labels", {}).get("declared", []), "dropped_columns": {}, "rejected_values": {}}
    for m in manifests:
        src = {k: v for k, v in m.get("sources", {}).items() if k != "part"}
        _add_counts(sources, src)
        _add_counts(warnings, m.get("warnings", {}))
        for k in ("dropped_columns", "rejected_values"):
            _add_counts(labels[k], m.get("labels", {}).get(k, {}))
    sources["merged_parts"] = sorted(parts)
    config = _config_without_part(first)
    return writer.close(deid=first.get("deid"), identifiable=first.get("identifiable", False),
                        preprocessing=first.get("preprocessing", {}),
                        vocabularies={"ehr": vocab} if len(vocab) > 2 else {}, split=first.get("split"),
                        sources=sources, warnings=dict(sorted(warnings.items())), labels=labels, config=config)

