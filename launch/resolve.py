"""Resolve and check a run config before any process starts.

``medfm launch`` fails here, in one line naming the key, for everything that would otherwise fail minutes later on
every rank: unknown or mistyped keys (with the closest valid key, via medfm.schema), wrong types, batch arithmetic
that does not fit the world size, and shard directories that do not exist. The RunConfig itself (and its own
``validate``) belongs to medfm.pretrain.config; this module only adds the checks that need the world layout or the
file system.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from medfm.schema import ConfigError, apply_overrides, read_yaml_mapping, to_dict
from medfm.schema.atomic import atomic_write
from medfm.shards.manifest import ManifestError, load_manifest

RUNS_ROOT = "runs"


def _raw(path) -> dict:
    return read_yaml_mapping(path)


def resolve_config(path, overrides=(), runs_root: str = RUNS_ROOT):
    """YAML + dotted overrides -> a validated RunConfig whose ``run_dir`` defaults to ``runs/<name>``.

    ``run_dir`` given in the file or an override wins; otherwise it follows the (possibly overridden) name, so
    ``medfm launch demo.yaml name=try2`` gets its own run directory instead of reusing demo's checkpoints."""
    from medfm.pretrain.config import RunConfig
    from medfm.schema import from_dict

    data = apply_overrides(_raw(path), list(overrides), RunConfig)
    if "run_dir" not in data:
        name = data.get("name", RunConfig.name)
        data["run_dir"] = str(Path(runs_root) / str(name))
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_shards(cfg) -> None:
    """Every local shard source must be a directory holding ``manifest.json`` (URL templates are checked by the
    loader when it opens them)."""
    for i, src in enumerate(cfg.data.sources):
        if "://" in src.path or "{" in src.path:
            continue
        p = Path(os.path.expanduser(src.path))
        if not p.is_dir():
            raise ConfigError(f"data.sources[{i}].path: no shard directory at {p} (build one with `medfm shards build`)")
        if not (p / "manifest.json").is_file():
            raise ConfigError(f"data.sources[{i}].path: {p} has no manifest.json (not a medfm shard directory)")
        try:
            manifest = load_manifest(p)
        except ManifestError as exc:
            raise ConfigError(f"data.sources[{i}].path: {exc}") from None
        split = cfg.data.split
        have = manifest["totals"]["samples"] if split is None else manifest["totals"].get("splits", {}).get(split, 0)
        if not have:
            raise ConfigError(f"data.sources[{i}].path: {p} holds no {split or ''} samples (check `medfm shards "
                              f"inspect {p}`)".replace("no  samples", "no samples"))
        if cfg.data.on_missing_shard == "error":
            check_shard_files(p, manifest, split)


def check_shard_files(directory: Path, manifest: dict, split) -> None:
    """The loader's check before step 1 (shards/preflight.py), run once by the launcher too: a bad shard then stops
    the launch in one line (exit 1) instead of failing every rank of every ``--max-restarts`` attempt."""
    from medfm.shards.preflight import ShardCheckError, check_shard

    for shard in manifest["shards"]:
        if split is not None and not shard["splits"].get(split):
            continue
        problem = check_shard(str(directory / shard["name"]), shard)
        if problem is not None:
            raise ShardCheckError(f"source {directory.name}: shard {problem} (set data.on_missing_shard=skip to "
                                  "train without it, counted)")


def check_world(cfg, world_sizes) -> None:
    """Batch arithmetic for every world size the launch can produce (one for a fixed node count; each of an
    elastic MIN:MAX range)."""
    t = cfg.train
    sizes = sorted(set(world_sizes))
    if t.global_batch and len(sizes) > 1:
        raise ConfigError(f"train.global_batch={t.global_batch} is fixed but elastic --nnodes gives world sizes "
                          f"{sizes[0]}..{sizes[-1]}; set train.global_batch=0 (derived) for an elastic range")
    for w in sizes:
        t.check_world(w)


def rdzv_id(name: str) -> str:
    """Rendezvous id from the run name: agents of the same run meet, different runs on one host never do."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "medfm"


def resolved_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg, run_dir: Path) -> Path:
    """runs/<name>/config.yaml, written atomically (every node of a shared file system may write the same text)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    text = resolved_yaml(cfg)
    if out.is_file() and out.read_text() == text:
        return out
    return atomic_write(out, text)


def check_fresh_run(cfg) -> None:
    """A launch that does not ask to resume must not start in a run directory that holds checkpoints: its workers
    would otherwise pick them up on a restart (and interleave or prune them). The same rule as pretrain's own
    fresh-run guard, checked before torchrun starts so no restart can bypass it."""
    from medfm.model_zoo import checkpoint_io

    root = Path(cfg.run_dir) / "checkpoints"
    earlier = checkpoint_io.complete_tags(root)
    if earlier and not cfg.checkpoint.resume:
        raise ConfigError(f"run_dir {cfg.run_dir} already holds checkpoints ({', '.join(earlier[-2:])}) of an "
                          "earlier run: pass checkpoint.resume=latest to continue it, or a new name/run_dir")
