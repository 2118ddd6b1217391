"""The streaming loader every training run and eval uses: shards -> batches for one rank of a torch.distributed world.

Design (why it is not a plain ``wds.WebDataset(...).shuffle(...)`` pipeline): a shard-level split (``split_by_node``
then ``split_by_worker``) gives ranks different numbers of samples (collectives hang at the epoch end), cannot resume
mid-epoch exactly, and changes the sample order whenever the world size changes. Instead:

1. **Global order.** Each source (a shard directory) has a sample table from its manifest: (shard, index in shard)
   for every sample of the requested split. For each (seed, source, epoch, pass) the order of that table is a seeded
   permutation: shards are shuffled, cut into windows of ``shuffle_window_shards`` shards (0 = one window = a full
   shuffle), and samples are shuffled within each window.
2. **Global batches.** Step ``s`` has ``B = batch_size * world_size`` slots. The step plan (plan.py) picks the
   modality group; mix.py assigns each slot to one of the group's sources by weight; slot ``i`` takes the next
   position of its source's order (per-source cursors). All of this is a pure function of (seed, step, cursors).
3. **Partition.** Rank ``r`` takes slots ``r, r + world, r + 2*world, ...`` of every global batch; DataLoader worker
   ``w`` of ``W`` builds the batches of steps ``start + w, start + w + W, ...`` (the DataLoader returns them in step
   order). Ranks and workers therefore read disjoint samples, every rank yields the same number of batches of the
   same size, and the whole world together reads the global order exactly once per epoch.
4. **Exact resume.** ``state_dict()`` holds the next step and the per-source cursors (plus counters); everything
   else is recomputed. A run resumed at step k yields exactly the batches an uninterrupted run yields from step k.
   With a different world size but the same global batch (e.g. 2 ranks x 8 -> 4 ranks x 4) the same global batches
   are produced and re-partitioned over the new ranks: the global sample sequence is unchanged. A different global
   batch size is refused with a clear error (the step -> samples mapping would change).
5. **Equal steps, faults.** Steps per epoch come from the manifests: ``ceil(total / B)`` (``floor`` with
   ``drop_last``); the last batch is completed with the first samples of the next shuffled pass (flagged in
   ``batch["resampled"]``). A sample that cannot be read or decoded is counted by reason (corrupt.py) and replaced by
   a sample drawn from the same source with a hash of (seed, step, slot, attempt), so step counts never change.

Sources are local shard directories or URL templates with ``{name}`` (``"pipe:aws s3 cp s3://bucket/ds/{name} -"``,
``"https://host/ds/{name}"``): ``{name}`` is replaced by ``manifest.json`` and each shard name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medfm.schema import ConfigError
from medfm.shards.augment import AugmentConfig, augment_sample
from medfm.shards.collate import CollateConfig, Tokenizer, collate
from medfm.shards.corrupt import ReadError, ReplacementExhausted, SkipCounters, decode_or_reason
from medfm.shards.manifest import MODALITIES, SPLITS, ManifestError, load_manifest, validate_manifest
from medfm.shards.mix import TAG_AUGMENT, TAG_ORDER, TAG_REPLACE, allocate, hash_ints, normalize_weights, rng_for
from medfm.shards.plan import GroupConfig, PlanConfig, StepPlan, StepPlanner
from medfm.shards.preflight import ShardCheckError, check_shard
from medfm.shards.stream import ShardReader

STATE_VERSION = 1


@dataclass
class SourceConfig:
    path: str                       # shard directory, or a URL template containing "{name}"
    weight: float = 1.0             # share of batch slots (relative to the other sources of its group)
    group: str | None = None        # plan group it feeds; None = inferred from its modalities
    name: str | None = None         # for logs and state; default: the directory name

    def validate(self):
        if not self.path:
            raise ValueError("source path must be non-empty")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"source {self.path}: weight must be a finite number >= 0, got {self.weight}")


@dataclass
class LoaderConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    split: str | None = "train"                       # None = every sample regardless of split
    batch_size: int = 8                               # per rank; global batch = batch_size * world_size
    num_workers: int = 2                              # DataLoader worker processes per rank
    seed: int = 0
    mode: Literal["epoch", "resampled"] = "epoch"     # resampled = endless, a fresh shuffled pass after each
    shuffle: bool = True
    shuffle_window_shards: int = 0                    # 0 = shuffle over the whole dataset
    drop_last: bool = False
    steps_per_epoch: int | None = None                # default from the manifests
    max_replacements: int = 32                        # consecutive bad draws for one slot before giving up
    # A shard that is missing, has another size than the manifest says, or is not a tar (checked before step 1,
    # preflight.py): "error" stops with its name (exit 1); "skip" leaves it out and counts the lost samples.
    on_missing_shard: Literal["error", "skip"] = "error"
    prefetch_factor: int = 2
    pin_memory: bool = False
    plan: PlanConfig = field(default_factory=PlanConfig)
    collate: CollateConfig = field(default_factory=CollateConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self):
        if not self.sources:
            raise ValueError("loader.sources must list at least one shard directory")
        for s in self.sources:
            s.validate()
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"loader.split must be one of {list(SPLITS)} or null, got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"loader.num_workers must be >= 0, got {self.num_workers}")
        if self.mode not in ("epoch", "resampled"):
            raise ValueError(f"loader.mode must be epoch|resampled, got {self.mode!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"loader.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.max_replacements < 1:
            raise ValueError(f"loader.max_replacements must be >= 1, got {self.max_replacements}")
        if self.on_missing_shard not in ("error", "skip"):
            raise ValueError(f"loader.on_missing_shard must be error|skip, got {self.on_missing_shard!r}")
        self.plan.validate()
        self.collate.validate()
        self.augment.validate()


# ---------------------------------------------------------------------------------------------------------------
# sources


@dataclass
class Source:
    """One shard directory, resolved: the shards and the sample table (shard id, index in shard) of the split."""

    name: str
    urls: list[str]
    shard: np.ndarray        # int32 [N]
    index: np.ndarray        # int32 [N]
    shard_start: np.ndarray  # int64 [n_shards + 1]: the table rows of shard j are shard_start[j]:shard_start[j+1]
    modalities: tuple[str, ...]
    weight: float
    group: str | None
    fingerprint: str
    # samples of the split left out because their shard failed the check before step 1, by reason
    lost: dict[str, int] = field(default_factory=dict)
    # per shard (table shard id): the manifest's per-sample {member: [bytes, crc32]} list, or None (older manifest)
    checksums: list | None = None

    def __len__(self) -> int:
        return len(self.shard)


def _url_for(path: str, name: str) -> str:
    return path.format(name=name) if "{name}" in path else str(Path(path) / name)


def _read_manifest(path: str) -> dict:
    if "{name}" not in path:
        return load_manifest(path)
    import webdataset as wds

    url = _url_for(path, "manifest.json")
    try:
        with wds.gopen(url, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except Exception as exc:
        raise ManifestError(f"{url}: cannot read manifest ({exc.__class__.__name__}: {exc})") from None
    validate_manifest(manifest, url)
    return manifest


def resolve_source(cfg: SourceConfig, split: str | None, reader: ShardReader | None = None,
                   on_missing: str = "error") -> Source:
    """Read the manifest, check every shard of the split (preflight.py) and build the sample table.

    Shards holding several splits are scanned (meta.json only). A shard that fails the check, or a mixed shard
    yielding fewer samples of ``split`` than the manifest counts, raises ShardCheckError naming it, or with
    ``on_missing="skip"`` is left out and its samples counted in ``Source.lost`` by reason."""
    manifest = _read_manifest(cfg.path)
    name = cfg.name or (Path(cfg.path).name if "{name}" not in cfg.path else cfg.path)
    urls, shard_ids, indices, sums = [], [], [], []
    lost: dict[str, int] = {}
    dropped: list[str] = []
    reader = reader or ShardReader()

    def lose(shard_name: str, reason: str, n: int, message: str) -> None:
        if on_missing != "skip":
            raise ShardCheckError(f"source {name}: shard {message} (set data.on_missing_shard=skip to train "
                                  "without it, counted)")
        lost[reason] = lost.get(reason, 0) + n
        dropped.append(f"{shard_name}:{reason}")

    for shard in manifest["shards"]:
        n = int(shard["samples"])
        in_split = n if split is None else int(shard["splits"].get(split, 0))
        if in_split == 0:
            continue
        url = _url_for(cfg.path, shard["name"])
        problem = check_shard(url, shard)
        if problem is not None:
            lose(shard["name"], problem.reason, in_split, str(problem))
            continue
        if in_split == n:
            idx = np.arange(n, dtype=np.int32)
        else:  # a mixed shard: find which samples are ours (reads only meta.json of each)
            keep, failure = [], None
            for i in range(n):
                try:
                    meta = json.loads(reader.read(url, i, only=("meta.json",)).get("meta.json", b"{}"))
                except ReadError as exc:
                    failure = failure or exc
                    continue
                except ValueError:
                    continue  # undecodable meta: counted at read time if drawn; its split is unknown here
                if isinstance(meta, dict) and meta.get("split") == split:
                    keep.append(i)
            if len(keep) < in_split and failure is not None:
                lose(shard["name"], failure.reason, in_split - len(keep), f"{shard['name']}: {failure.message}")
                if not keep:
                    continue
            idx = np.asarray(keep, dtype=np.int32)
        urls.append(url)
        sums.append(shard.get("members"))
        shard_ids.append(np.full(len(idx), len(urls) - 1, dtype=np.int32))
        indices.append(idx)
    if not urls or sum(len(i) for i in indices) == 0:
        why = f", {sum(lost.values())} lost to bad shards {lost}" if lost else ""
        raise ManifestError(f"{cfg.path}: no samples of split {split!r} (manifest splits: "
                            f"{manifest.get('totals', {}).get('splits')}{why})")
    counts = np.array([len(i) for i in indices], dtype=np.int64)
    mods = tuple(m for m in MODALITIES if manifest.get("totals", {}).get("modalities", {}).get(m))
    if not mods:
        mods = tuple(m for m in MODALITIES if any(s["modalities"].get(m) for s in manifest["shards"]))
    # What is really readable: the manifest's checksums plus the shards left out (absent when none, so a clean
    # set keeps the fingerprint older checkpoints recorded).
    ident = [s.get("sha256") for s in manifest["shards"]] + [split] + ([{"dropped": dropped}] if dropped else [])
    fingerprint = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    return Source(name=name, urls=urls, shard=np.concatenate(shard_ids), index=np.concatenate(indices),
                  shard_start=np.concatenate([[0], np.cumsum(counts)]), modalities=mods, weight=cfg.weight,
                  group=cfg.group, fingerprint=fingerprint, lost=lost,
                  checksums=sums if any(x is not None for x in sums) else None)


def check_members(members: dict, expected: dict | None, where: str) -> None:
    """ReadError("checksum_mismatch") when a member's bytes differ from the manifest's [bytes, crc32]."""
    if not expected:
        return
    for suffix, (nbytes, crc) in expected.items():
        data = members.get(suffix)
        if data is None:
            continue  # absent member: decoding reports missing_member
        if len(data) != nbytes or zlib.crc32(data) != crc:
            raise ReadError("checksum_mismatch", f"{where}.{suffix}: {len(data)} bytes crc32 "
                            f"{zlib.crc32(data):08x}, manifest says {nbytes} bytes {crc:08x}")


# ---------------------------------------------------------------------------------------------------------------
# the schedule: a pure function of (seed, step, cursors)


class Schedule:
    """Which sample fills every slot of every global batch. Identical in every rank and worker by construction."""

    def __init__(self, sources: list[Source], planner: StepPlanner, global_batch: int, seed: int, mode: str,
                 shuffle: bool, window: int, drop_last: bool, steps_per_epoch: int | None):
        self.sources = sources
        self.planner = planner
        self.global_batch = global_batch
        self.seed = seed
        self.mode = mode
        self.shuffle = shuffle
        self.window = window
        self.sizes = np.array([len(s) for s in sources], dtype=np.int64)
        self._orders: OrderedDict[tuple, np.ndarray] = OrderedDict()
        # Sources per plan group (index None = policy "all": every source), with normalised weights.
        self._by_group: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
        groups = planner.groups if planner.config.policy != "all" else [None]
        for gi, g in enumerate(groups):
            if g is None:
                ids = np.arange(len(sources))
                key = None
            else:
                ids = np.array([i for i, s in enumerate(sources) if s.group == g.name], dtype=np.int64)
                key = gi
                if len(ids) == 0:
                    raise ValueError(f"plan group {g.name!r} has no source (set sources[].group)")
            w = normalize_weights([sources[i].weight for i in ids], f"weights of the sources of group {key}")
            self._by_group[key] = (ids, w)
        total = int(self.sizes.sum())
        if steps_per_epoch is not None:
            self.steps_per_epoch = int(steps_per_epoch)
        else:
            self.steps_per_epoch = total // global_batch if drop_last else -(-total // global_batch)
            if self.steps_per_epoch == 0:
                raise ValueError(f"{total} samples are fewer than one global batch ({global_batch}) with drop_last")

    # -- sample orders -----------------------------------------------------------------------------------------
    def order(self, m: int, epoch: int, pass_: int) -> np.ndarray:
        key = (m, epoch, pass_)
        hit = self._orders.get(key)
        if hit is not None:
            self._orders.move_to_end(key)
            return hit
        src = self.sources[m]
        n = len(src)
        if not self.shuffle:
            out = np.arange(n, dtype=np.int64)
        else:
            rng = rng_for(self.seed, TAG_ORDER, m, epoch, pass_)
            n_shards = len(src.urls)
            if self.window <= 0 or self.window >= n_shards:
                out = rng.permutation(n)
            else:
                starts = src.shard_start
                shard_order = rng.permutation(n_shards)
                parts = []
                for w0 in range(0, n_shards, self.window):
                    rows = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in shard_order[w0:w0 + self.window]])
                    parts.append(rng.permutation(rows))
                out = np.concatenate(parts)
        self._orders[key] = out
        while len(self._orders) > 2 * len(self.sources) + 2:  # current + next pass of every source
            self._orders.popitem(last=False)
        return out

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch if self.mode == "epoch" else 0

    def plan(self, step: int) -> StepPlan:
        return self.planner(step)

    def advance(self, step: int, cursors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(source per slot, position per slot, cursors after)`` of global batch ``step``."""
        if self.mode == "epoch" and step % self.steps_per_epoch == 0:
            cursors = np.zeros_like(cursors)  # a new epoch starts every source at the top of a fresh order
        ids, weights = self._by_group[self.planner.group_index(step)]
        src = ids[allocate(weights, self.global_batch, self.seed, step)]
        pos = np.empty(self.global_batch, dtype=np.int64)
        after = cursors.copy()
        for m in np.unique(src):
            slots = np.flatnonzero(src == m)
            pos[slots] = cursors[m] + np.arange(len(slots))
            after[m] += len(slots)
        return src, pos, after

    def locate(self, m: int, epoch: int, position: int) -> tuple[int, bool]:
        """Row of source ``m``'s sample table at ``position`` of ``epoch``; True if it repeats within the epoch."""
        n = int(self.sizes[m])
        pass_ = position // n
        return int(self.order(m, epoch, pass_)[position % n]), (self.mode == "epoch" and pass_ > 0)

    def replacement(self, m: int, step: int, slot: int, attempt: int) -> int:
        return int(hash_ints(self.seed, TAG_REPLACE, m, step, slot, attempt) % int(self.sizes[m]))


# ---------------------------------------------------------------------------------------------------------------
# the per-rank dataset (runs in DataLoader workers)


class ShardDataset(IterableDataset):
    """Yields the collated batches of this rank for steps ``[start, stop)`` (stop None = endless)."""

    def __init__(self, schedule: Schedule, config: LoaderConfig, rank: int, world_size: int, start: int,
                 cursors: np.ndarray, stop: int | None, tokenizer: Tokenizer | None = None):
        self.schedule = schedule
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.cursors = np.asarray(cursors, dtype=np.int64)
        self.stop = stop
        self.tokenizer = tokenizer

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader()
        cursors = self.cursors.copy()
        step = self.start
        try:
            while self.stop is None or step < self.stop:
                src, pos, after = self.schedule.advance(step, cursors)
                if (step - self.start) % n_workers == worker:
                    yield self.build(step, src, pos, after, reader)
                cursors = after
                step += 1
        finally:
            reader.close()

    def _fetch(self, reader: ShardReader, m: int, row: int):
        s = self.schedule.sources[m]
        j, i = int(s.shard[row]), int(s.index[row])
        members = reader.read(s.urls[j], i)
        if s.checksums is not None and s.checksums[j] is not None and i < len(s.checksums[j]):
            check_members(members, s.checksums[j][i], f"{s.urls[j]}:{members.get('__key__')}")
        return members

    def build(self, step: int, src: np.ndarray, pos: np.ndarray, after: np.ndarray, reader: ShardReader) -> dict:
        sched, cfg = self.schedule, self.config
        epoch = sched.epoch_of(step)
        skipped = SkipCounters()   # every bad read, replacements' included
        in_order = SkipCounters()  # bad samples met at their place in an epoch's first pass: the corruption rate
        samples, repeated = [], []
        for slot in range(self.rank, sched.global_batch, self.world_size):
            m = int(src[slot])
            row, repeat = sched.locate(m, epoch, int(pos[slot]))
            first_pass = not repeat
            sample = None
            for attempt in range(cfg.max_replacements + 1):
                if attempt:
                    row, repeat = sched.replacement(m, step, slot, attempt), True
                try:
                    members = self._fetch(reader, m, row)
                except ReadError as exc:
                    skipped.add(exc.reason, exc.message)
                    if not attempt and first_pass:
                        in_order.add(exc.reason)
                    continue
                sample, reason, message = decode_or_reason(members)
                if sample is not None and cfg.split is not None and sample.meta.get("split") != cfg.split:
                    sample, reason, message = None, "split_mismatch", f"{sample.key}: split {sample.meta.get('split')}"
                if sample is not None:
                    break
                skipped.add(reason, message)
                if not attempt and first_pass:
                    in_order.add(reason)
            if sample is None:
                raise ReplacementExhausted(
                    f"source {sched.sources[m].name}: {cfg.max_replacements + 1} bad samples in a row for step {step} "
                    f"slot {slot} ({skipped.as_dict()}); run `medfm shards verify` on it")
            if cfg.augment.enabled:
                sample = augment_sample(sample, rng_for(cfg.seed, TAG_AUGMENT, step, slot), cfg.augment, cfg.collate)
            samples.append(sample)
            repeated.append(repeat)
        batch = collate(samples, sched.plan(step), cfg.collate, self.tokenizer)
        batch["resampled"] = torch.tensor(repeated, dtype=torch.bool)
        batch["_medfm"] = {"step": step, "cursors": after.tolist(), "skipped": skipped.as_dict(),
                           "in_order": in_order.as_dict(), "examples": skipped.examples}
        return batch


# ---------------------------------------------------------------------------------------------------------------
# the public loader


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _infer_groups(plan: PlanConfig, sources: list[Source]) -> PlanConfig:
    """Fill in plan groups from the data when none are configured, and each source's group when not named."""
    if not plan.groups:
        mods = [m for m in MODALITIES if any(m in s.modalities for s in sources)]
        plan = PlanConfig(policy="all", groups=[GroupConfig(name="all", modalities=mods)], seed=plan.seed)
    if plan.policy != "all":
        names = {g.name for g in plan.groups}
        for s in sources:
            if s.group is not None:
                if s.group not in names:
                    raise ValueError(f"source {s.name}: group {s.group!r} is not a plan group ({sorted(names)})")
                continue
            fits = [g.name for g in plan.groups if set(g.modalities) <= set(s.modalities)]
            if len(fits) != 1:
                raise ValueError(f"source {s.name} (modalities {list(s.modalities)}) fits plan groups {fits}; "
                                 "set sources[].group")
            s.group = fits[0]
    return plan


class ShardLoader:
    """Batches of one rank. ``for batch in loader`` runs to the end of the current epoch (endless when resampled).

    >>> loader = ShardLoader(LoaderConfig(sources=[SourceConfig("runs/shards")], batch_size=8))
    >>> for batch in loader: ...
    >>> state = loader.state_dict()            # save with the checkpoint; ShardLoader(...).load_state_dict(state)
    """

    def __init__(self, config: LoaderConfig, rank: int | None = None, world_size: int | None = None,
                 tokenizer: Tokenizer | None = None):
        config.validate()
        if rank is None or world_size is None:
            r, w = _dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer
        reader = ShardReader()
        try:
            self.sources = []
            for i, s in enumerate(config.sources):
                try:
                    self.sources.append(resolve_source(s, config.split, reader, config.on_missing_shard))
                except ManifestError as exc:  # a config problem (which source), not a crash: exit 2, one line
                    raise ConfigError(f"data.sources[{i}].path: {exc}") from None
        finally:
            reader.close()
        self.plan_config = _infer_groups(config.plan, self.sources)
        self.planner = StepPlanner(self.plan_config)
        self.schedule = Schedule(self.sources, self.planner, config.batch_size * world_size, config.seed, config.mode,
                                 config.shuffle, config.shuffle_window_shards, config.drop_last,
                                 config.steps_per_epoch)
        self.step = 0
        self.cursors = np.zeros(len(self.sources), dtype=np.int64)
        # counters: every skipped read by reason (replacement draws included), for logging;
        # bad_in_order: only bad samples met at their own position in the first pass of an epoch's order (summed
        # over ranks: each corrupt sample of the dataset exactly once per epoch).
        self.counters = SkipCounters()
        self.bad_in_order = SkipCounters()

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.schedule.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __len__(self) -> int:
        """Batches left in the current epoch (what one ``for batch in loader`` yields)."""
        if self.config.mode != "epoch":
            raise TypeError("a resampled (endless) loader has no length; use steps_per_epoch")
        return (self.epoch + 1) * self.steps_per_epoch - self.step

    def plan(self, step: int) -> StepPlan:
        """The step plan of ``step`` (the same on every rank; no data needed)."""
        return self.planner(step)

    # -- iteration -------------------------------------------------------------------------------------------
    def _dataset(self, stop: int | None) -> ShardDataset:
        return ShardDataset(self.schedule, self.config, self.rank, self.world_size, self.step, self.cursors, stop,
                            self.tokenizer)

    def __iter__(self):
        stop = (self.epoch + 1) * self.steps_per_epoch if self.config.mode == "epoch" else None
        ds = self._dataset(stop)
        nw = self.config.num_workers
        # An own generator: otherwise starting the iterator draws a base seed from the global torch RNG, and the
        # training RNG stream (dropout, MAE masks) would depend on when epochs start (breaking exact resume).
        # Nothing here uses the worker seeds; all randomness is hashed from (seed, step, slot).
        dl = DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=self.config.pin_memory,
                        prefetch_factor=self.config.prefetch_factor if nw > 0 else None,
                        generator=torch.Generator().manual_seed(self.config.seed))
        for batch in dl:
            info = batch.pop("_medfm")
            if info["step"] != self.step:  # DataLoader returns worker outputs in order; anything else is a bug
                raise RuntimeError(f"loader produced step {info['step']} where step {self.step} was expected")
            self.counters.update(info["skipped"])
            self.bad_in_order.update(info["in_order"])
            for ex in info["examples"]:
                if len(self.counters.examples) < self.counters.keep_examples:
                    self.counters.examples.append(ex)
            self.step = info["step"] + 1
            self.cursors = np.asarray(info["cursors"], dtype=np.int64)
            yield batch

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-safe position: the next step and per-source cursors (+ what must match on resume)."""
        return {"version": STATE_VERSION, "step": int(self.step), "cursors": [int(c) for c in self.cursors],
                "seed": self.config.seed, "global_batch": self.global_batch, "mode": self.config.mode,
                "steps_per_epoch": self.steps_per_epoch,
                "sources": [{"name": s.name, "samples": len(s), "fingerprint": s.fingerprint} for s in self.sources],
                "counters": self.counters.as_dict(), "bad_in_order": self.bad_in_order.as_dict(),
                "lost": self.lost(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in (("seed", self.config.seed), ("global_batch", self.global_batch),
                          ("mode", self.config.mode), ("steps_per_epoch", self.steps_per_epoch)):
            if state.get(key) != mine:
                hint = (" (keep batch_size * world_size constant when the world size changes)"
                        if key == "global_batch" else "")
                raise ValueError(f"loader state: {key} was {state.get(key)!r}, this loader has {mine!r}{hint}")
        theirs = [(s["name"], s["samples"], s["fingerprint"]) for s in state.get("sources", [])]
        mine = [(s.name, len(s), s.fingerprint) for s in self.sources]
        if theirs != mine:
            raise ValueError(f"loader state: sources {theirs} do not match this loader's {mine}")
        self.step = int(state["step"])
        self.cursors = np.asarray(state["cursors"], dtype=np.int64)
        self.counters = SkipCounters(state.get("counters") or {})
        self.bad_in_order = SkipCounters(state.get("bad_in_order") or {})

    def lost(self) -> dict[str, dict[str, int]]:
        """Samples left out before step 1 (shards that failed the check), per source and reason; the same on every
        rank (every rank checks the same files)."""
        return {s.name: dict(s.lost) for s in self.sources if s.lost}

    def all_counters(self, which: str = "counters", gather_objects=None) -> dict[str, int]:
        """``counters`` (or ``bad_in_order``) summed over all ranks; a collective under torch.distributed.

        ``gather_objects(obj) -> [obj of every rank]`` is the caller's collective (training passes
        ``medfm.pretrain.collectives.all_gather_objects``, the one owner of the collectives medfm issues; shards never
        import training code). Without it, inside a world of more than one process, this refuses rather than
        return one rank's counts as if they were the total."""
        mine = getattr(self, which)
        if not isinstance(mine, SkipCounters):
            raise ValueError(f"which must be 'counters' or 'bad_in_order', got {which!r}")
        if gather_objects is None:
            if self.world_size > 1:
                raise ValueError("all_counters: a world of more than one process needs gather_objects "
                                 "(e.g. medfm.pretrain.collectives.all_gather_objects)")
            return SkipCounters(mine.counts).as_dict()
        total = SkipCounters()
        for c in gather_objects(mine.as_dict()):
            total.update(c)
        return total.as_dict()


def build_loader(config: LoaderConfig | dict, rank: int | None = None, world_size: int | None = None,
                 tokenizer: Tokenizer | None = None) -> ShardLoader:
    """``ShardLoader`` from a LoaderConfig or a plain dict (validated with medfm.schema.from_dict)."""
    if isinstance(config, dict):
        from medfm.schema import from_dict

        config = from_dict(LoaderConfig, config, "loader")
    return ShardLoader(config, rank=rank, world_size=world_size, tokenizer=tokenizer)
