"""The run config: one typed tree composed from every part's config, loaded from YAML + dotted overrides.

    name, run_dir
    data:        medfm.shards.loader.LoaderConfig   (shards, mixing, step plan, batch size)
    model:       medfm.model_zoo.MultiModalConfig   (towers, heads, decoders)
    objectives:  [ObjectiveConfig]                  (name, weight, options)
    optim / train / zero / checkpoint / tracking / eval   (this file)

``load_run_config(path, overrides)`` is the one parse of a recipe (``medfm launch``, ``medfm pretrain``, sweeps);
``write_run_config`` the one writer of ``<run_dir>/config.yaml``, which a launch's workers load as it is
(``load_run_config(that file)``, no overrides). Derived values have one owner here: the micro-batch
(``RunConfig.micro_batch`` = ``data.batch_size``), the global batch (``RunConfig.global_batch(world)``), the batch
arithmetic against the world sizes (``RunConfig.check_world``) and the ``run_dir`` default (``default_run_dir``);
collate vs tower input sizes are cross-checked by ``validate`` (medfm.model_zoo.input_sizes). Every error is one
line naming the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from medfm.model_zoo import MultiModalConfig
from medfm.pretrain.objectives import ObjectiveConfig, check_objectives_fit
from medfm.schema import ConfigError, apply_overrides, from_dict, read_yaml_mapping, to_dict
from medfm.schema.atomic import atomic_write
from medfm.shards.loader import LoaderConfig

CONFIG_FILE = "config.yaml"  # <run_dir>/config.yaml: the resolved config every rank and every restart reads
RUNS_ROOT = "runs"


def default_run_dir(name: str) -> str:
    """``run_dir`` when a config names none: ``runs/<name>`` (so ``name=try2`` gets its own run directory)."""
    return f"{RUNS_ROOT}/{name}"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``; global-norm clipping."""

    lr: float = 1e-3
    weight_decay: float = 0.05  # not applied to biases, norms, embeddings of shape [1] (all params with ndim <= 1)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables

    def validate(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO-3 options (strategy: zero3)."""

    offload_optimizer: bool = False  # optimizer state + fp32 master weights on CPU
    offload_params: bool = False
    stage3_param_persistence_threshold: int = 100_000  # params smaller than this stay unpartitioned (0 = all)
    stage3_prefetch_bucket_size: int = 50_000_000  # elements fetched ahead of use (DeepSpeed default)
    stage3_max_live_parameters: int = 1_000_000_000  # gathered elements kept resident before release
    stage3_max_reuse_distance: int = 1_000_000_000  # keep a gathered param if reused within this many elements
    reduce_bucket_size: int = 50_000_000
    contiguous_gradients: bool = True
    # Build under deepspeed.zero.Init: each module is partitioned as soon as it is built, so the model is never whole
    # on one rank (model_zoo initialises one gathered leaf at a time; same values as an ordinary build). Pretrained
    # weights (text_minilm, model.init_from) are filled module by module into the partitions (model_zoo.init_from).
    zero_init: bool = True
    overlap_comm: bool = False  # comm on a side stream: a GPU option (CPU/gloo: no gain, docs/notes/pretrain.md)
    device_memory_gib: float = 0.0  # memory of one device; `medfm launch --dry-run` checks the estimate (0 = unknown)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    # Deprecated mirror of data.batch_size (the loader's batch is the micro-batch): 0 or the same value. Read
    # RunConfig.micro_batch instead.
    micro_batch: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step; 0 = derived: global_batch / (data.batch_size x world)
    global_batch: int = 0  # optional check: must equal data.batch_size * grad_accum * world_size
    precision: Literal["fp32", "bf16"] = "fp32"
    strategy: Literal["zero3", "ddp"] = "zero3"
    seed: int = 0
    log_every: int = 1
    nan_guard: int = 3  # this many consecutive non-finite steps stop the run; 0 disables the stop
    grad_checkpointing: list[str] = field(default_factory=list)  # towers that recompute activations in backward
    tokenizer: Literal["tower", "bytes"] = "tower"  # text tokenizer: the text tower's HF one, or UTF-8 bytes
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = the GPU's published dense peak (pretrain/peak_flops.py)
    progress: bool = True
    # torch.compile each tower's forward (nn.Module.compile: parameter names unchanged). Opt-in: the first steps
    # pay the compile; DDP only (ZeRO-3's parameter hooks do not trace).
    compile: bool = False

    def validate(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.micro_batch < 0:
            raise ValueError(f"train.micro_batch must be >= 0, got {self.micro_batch}")
        if self.grad_accum < 0:
            raise ValueError(f"train.grad_accum must be >= 1 (or 0 = derived from train.global_batch), got "
                             f"{self.grad_accum}")
        if self.global_batch < 0:
            raise ValueError(f"train.global_batch must be >= 0, got {self.global_batch}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.nan_guard < 0:
            raise ValueError(f"train.nan_guard must be >= 0, got {self.nan_guard}")


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0 = only at the end)
    keep: int = 3  # keep the newest K step checkpoints
    resume: str = ""  # "" = fresh run, "latest" = the newest complete checkpoint, or a tag (e.g. step15)
    final: bool = True  # also save after the last step

    def validate(self):
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = sqlite:///<run_dir>/mlflow.db ; or http://host:port
    experiment: str = "medfm"
    run_name: str = ""  # "" = the run's name
    artifacts: bool = True  # resolved config + loss-curve PNG at the end
    timeout_s: float = 5.0  # per-request HTTP timeout before the server counts as unreachable


@dataclass
class EvalHookConfig:
    """A callable ``"package.module:function"`` called on every rank as ``fn(model, step, run_dir)`` every N steps
    (e.g. a medfm.evals linear probe), so training code never imports evals (dependency direction)."""

    every: int = 0
    hook: str = ""

    def validate(self):
        if self.every and ":" not in self.hook:
            raise ValueError(f"eval.hook must be 'package.module:function', got {self.hook!r}")


@dataclass
class ReleaseConfig:
    """Facts a model card states about use, copied verbatim into `medfm release`'s card (never invented there)."""

    licence: str = ""
    intended_use: str = ""
    out_of_scope: str = ""
    citation: str = ""


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = ""  # "" = default_run_dir(name): runs/<name>
    data: LoaderConfig = field(default_factory=LoaderConfig)
    model: MultiModalConfig = field(default_factory=MultiModalConfig)
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalHookConfig = field(default_factory=EvalHookConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    def validate(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")
        if not self.run_dir:
            self.run_dir = default_run_dir(self.name)
        if self.train.micro_batch and self.train.micro_batch != self.data.batch_size:
            raise ValueError(f"train.micro_batch ({self.train.micro_batch}) != data.batch_size "
                             f"({self.data.batch_size}): the loader's batch is the micro-batch")
        if not self.train.grad_accum and not self.train.global_batch:
            raise ValueError("train.grad_accum=0 (derived) needs train.global_batch (samples per optimizer step)")
        if self.train.global_batch and self.train.global_batch % (self.micro_batch * (self.train.grad_accum or 1)):
            raise ValueError(f"train.global_batch {self.train.global_batch} is not a multiple of micro_batch "
                             f"{self.micro_batch} x grad_accum {self.train.grad_accum or 1}")
        if not self.objectives:
            raise ValueError("objectives: at least one objective (e.g. {name: mae:image}) is required")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: duplicate name in {names}")
        for i, o in enumerate(self.objectives):
            try:
                o.validate()
            except ValueError as exc:
                raise ValueError(f"objectives[{i}]: {exc}") from None
        check_objectives_fit(self.objectives, self.model)
        for g in getattr(getattr(self.data, "plan", None), "groups", []) or []:
            for obj in g.objectives:
                if obj not in names:
                    raise ValueError(f"data.plan group {g.name!r} names objective {obj!r}, not in objectives {names}")
        if self.train.compile and self.train.strategy == "zero3":
            raise ValueError("train.compile=true needs train.strategy=ddp (ZeRO-3's parameter hooks do not "
                             "trace under torch.compile)")
        for t in self.train.grad_checkpointing:
            if t not in self.model.towers:
                raise ValueError(f"train.grad_checkpointing: no tower {t!r} (have {sorted(self.model.towers)})")
        from medfm.model_zoo.input_sizes import collate_mismatch

        mismatch = collate_mismatch(self.model, self.data.collate)
        if mismatch:
            raise ValueError(mismatch)

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    @property
    def micro_batch(self) -> int:
        """Samples per rank per micro-step: the loader's batch."""
        return self.data.batch_size

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step at ``world_size``: ``train.grad_accum``, or when that is 0 (derived)
        ``train.global_batch / (micro_batch x world_size)`` (ConfigError, one line, when it does not divide)."""
        t = self.train
        if t.grad_accum:
            return t.grad_accum
        per_step = self.micro_batch * world_size
        if t.global_batch % per_step:
            raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of micro_batch("
                              f"{self.micro_batch}) x world_size({world_size}) = {per_step}: train.grad_accum=0 "
                              "(derived) cannot be derived")
        return t.global_batch // per_step

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks: micro_batch x grad_accum x world_size."""
        return self.micro_batch * self.grad_accum(world_size) * world_size

    def check_world(self, world_sizes) -> None:
        """Batch arithmetic for every world size a launch can produce (an int, or each size of an elastic MIN:MAX
        range): ConfigError, one line."""
        sizes = sorted({world_sizes} if isinstance(world_sizes, int) else set(world_sizes))
        t = self.train
        if t.global_batch and len(sizes) > 1:
            raise ConfigError(f"train.global_batch={t.global_batch} is fixed but elastic --nnodes gives world sizes "
                              f"{sizes[0]}..{sizes[-1]}; set train.global_batch=0 and a fixed train.grad_accum for an elastic range")
        for w in sizes:
            if t.global_batch and t.global_batch != self.global_batch(w):
                raise ConfigError(f"train.global_batch={t.global_batch} != micro_batch({self.micro_batch}) x "
                                  f"grad_accum({t.grad_accum}) x world_size({w}) = {self.global_batch(w)}")

    def resolve_world(self, world_sizes) -> None:
        """``check_world``, then fix the derived ``train.grad_accum`` for the world (a fixed global batch allows
        one world size), so the written config.yaml and everything reading ``train.grad_accum`` see the number."""
        self.check_world(world_sizes)
        if not self.train.grad_accum:
            self.train.grad_accum = self.grad_accum(world_sizes if isinstance(world_sizes, int) else world_sizes[0])

    @property
    def config_file(self) -> Path:
        return Path(self.run_dir) / CONFIG_FILE


def load_run_config(path, overrides=()) -> RunConfig:
    """YAML file + ``key=value`` overrides -> validated RunConfig (ConfigError, one line naming the file). The one
    parse of a run config: a recipe at launch, or the resolved ``config.yaml`` a launch's workers start from.
    A bad override is named by its key alone (the file is not at fault)."""
    data = apply_overrides(read_yaml_mapping(path), list(overrides), RunConfig)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def run_config_text(cfg: RunConfig) -> str:
    """The resolved YAML of ``cfg`` as ``config.yaml`` holds it (and ``medfm launch --dry-run`` prints it)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_run_config(cfg: RunConfig) -> bool:
    """The one writer of ``<run_dir>/config.yaml``: atomic (every restart reads it, so it is never left torn; every
    node of a shared file system may write the same text), and nothing is written when the file already holds this
    text. True when the file was (re)written."""
    out = cfg.config_file
    text = run_config_text(cfg)
    if out.is_file() and out.read_text() == text:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return True
