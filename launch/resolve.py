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

from medfm.schema import ConfigError
from medfm.shards.manifest import ManifestError, load_manifest


def resolve_config(path, overrides=()):
    """YAML + dotted overrides -> a validated RunConfig (pretrain's ``load_run_config``: the one parse).

    ``run_dir`` given in the file or an override wins; otherwise it follows the (possibly overridden) name
    (``RunConfig.validate``: ``runs/<name>``), so ``medfm launch demo.yaml name=try2`` gets its own run directory
    instead of reusing demo's checkpoints."""
    from medfm.pretrain.config import load_run_config

    return load_run_config(path, list(overrides))


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


def rdzv_id(name: str) -> str:
    """Rendezvous id from the run name: agents of the same run meet, different runs on one host never do."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "medfm"


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
