"""``medfm shards verify DIR``: every shard's size and sha256 against the manifest, every sample decoded and
validated against the schema (medfm.shards.sample), per-shard counts re-derived. Returns a list of problems
``(shard, key, reason, message)``; empty means clean."""

from __future__ import annotations

import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medfm.shards.manifest import ManifestError, load_manifest
from medfm.shards.sample import SampleError, decode_sample
from medfm.shards.writer import sha256_file


@dataclass
class Problem:
    shard: str
    key: str
    reason: str
    message: str = ""

    def __str__(self):
        return f"{self.shard}\t{self.key or '-'}\t{self.reason}\t{self.message}"


def iter_tar_samples(path: Path):
    """Group tar members by key the way webdataset does (key = name up to the first dot). Yields member dicts."""
    with tarfile.open(path, mode="r:") as tar:
        current: dict | None = None
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            if "." not in name:
                raise tarfile.TarError(f"member {info.name!r} has no extension")
            key, ext = name.split(".", 1)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            if ext in current:
                raise tarfile.TarError(f"member {info.name!r} appears twice")
            current[ext] = tar.extractfile(info).read()
        if current is not None:
            yield current


def verify(directory, progress: bool = False) -> tuple[list[Problem], dict]:
    """(problems, stats) for a shard directory."""
    directory = Path(directory)
    try:
        manifest = load_manifest(directory)
    except ManifestError as exc:
        return [Problem("manifest.json", "", "bad_manifest", str(exc))], {}
    problems: list[Problem] = []
    stats = Counter()
    if not manifest["shards"]:
        problems.append(Problem("manifest.json", "", "empty", "the set holds no samples (every input was skipped; "
                                "see manifest skipped_inputs)"))
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in directory.glob(f"{manifest.get('prefix', 'shard')}-*.tar*")):
        if extra not in listed:
            problems.append(Problem(extra, "", "unlisted_file", "not in manifest (leftover or foreign file)"))
    keys_seen: dict[str, str] = {}
    patient_split: dict[str, str] = {}
    try:
        from tqdm import tqdm

        shards = tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress)
    except ImportError:
        shards = manifest["shards"]
    for shard in shards:
        name = shard["name"]
        path = directory / name
        if not path.is_file():
            problems.append(Problem(name, "", "missing_shard", "listed in manifest but absent"))
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(Problem(name, "", "size_mismatch", f"{size} bytes, manifest says {shard['bytes']}"))
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            problems.append(Problem(name, "", "checksum_mismatch", f"sha256 {digest[:12]}.. != manifest"))
        mods, splits, n = Counter(), Counter(), 0
        try:
            for members in iter_tar_samples(path):
                key = members["__key__"]
                n += 1
                try:
                    sample = decode_sample(members)
                except SampleError as exc:
                    problems.append(Problem(name, key, exc.reason, exc.message))
                    continue
                if key in keys_seen:
                    problems.append(Problem(name, key, "duplicate_key", f"also in {keys_seen[key]}"))
                keys_seen[key] = name
                pid, split = sample.meta["patient_id"], sample.meta["split"]
                if patient_split.setdefault(pid, split) != split:
                    problems.append(Problem(name, key, "split_leak", f"patient in {patient_split[pid]} and {split}"))
                for m in sample.modalities:
                    mods[m] += 1
                splits[split] += 1
                stats["samples"] += 1
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(Problem(name, "", "bad_tar", f"{exc.__class__.__name__}: {exc}"))
            continue
        if n != shard["samples"] or dict(mods) != shard["modalities"] or dict(splits) != shard["splits"]:
            problems.append(Problem(name, "", "count_mismatch",
                                    f"{n} samples {dict(mods)} {dict(splits)} vs manifest {shard['samples']} "
                                    f"{shard['modalities']} {shard['splits']}"))
        stats["shards"] += 1
    if stats["samples"] != manifest["totals"].get("samples", stats["samples"]) and not any(
            p.reason in ("bad_tar", "missing_shard") for p in problems):
        problems.append(Problem("manifest.json", "", "count_mismatch",
                                f"{stats['samples']} valid samples vs totals {manifest['totals'].get('samples')}"))
    return problems, dict(stats)
