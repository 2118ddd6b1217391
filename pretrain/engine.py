"""One training-engine API over two strategies: DeepSpeed ZeRO-3 (``zero3``) and plain torch DDP (``ddp``).

The loop (train.py) only calls ``forward / backward / grad_norms / step / save / load``; which strategy is behind
them is a config switch, so the DDP baseline in the benchmarks runs exactly the same model, objectives, optimizer
and schedule.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from medfm.pretrain import collectives, precision
from medfm.pretrain.config import RunConfig, lr_factor
from medfm.pretrain.ds_config import deepspeed_config
from medfm.pretrain.objectives import PretrainModule, build_objective


def setup_environment() -> None:
    """CPU-only hosts: DeepSpeed's CPU accelerator, without the shm-comm op (a 35 s JIT build) — before import.
    Everywhere: DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor, and the
    resulting FutureWarning, repeated per call site and rank, says nothing a user can act on."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed.ops
        except ImportError:  # DDP-only installs
            return
        # DeepSpeed would JIT-build its shm-comm op the first time it sets up comms (zero.Init or initialize);
        # gloo does the same job on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the torchrun world (env:// variables), or make a world of one when run alone. Returns (rank, world)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:  # alone: a world of one, so DeepSpeed and the collectives work unchanged
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def param_group_name(name: str) -> str:
    """Grad-norm group of a parameter: ``towers.image``, ``mae_decoders.image``, ``heads``, ``caption_decoder``,
    ``objectives.<i>`` (objective-owned modules such as an LM), or ``scalars``."""
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
        if parts[0] in ("towers", "mae_decoders"):
            return f"{parts[0]}.{parts[1]}"
        if parts[0] in ("logit_scale", "siglip_logit_scale", "logit_bias"):
            return "scalars"
        return parts[0]
    if parts[0] == "objectives":
        return f"objectives.{parts[1]}"
    return parts[0]


def _ndim(p: torch.Tensor) -> int:
    return len(getattr(p, "ds_shape", p.shape))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms and [1]-shaped scalars (ndim <= 1), as in MAE / CLIP recipes."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if _ndim(p) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_pretrained(model, model_cfg) -> None:
    """``model.init_from`` / ``model.towers.<m>.init_from`` into the built (maybe partitioned) model, one line
    per source on rank 0; a source that is missing or does not fit is a ConfigError."""
    from medfm.model_zoo.init_from import InitFromError, apply_init_from
    from medfm.pretrain import collectives
    from medfm.schema import ConfigError

    if not (model_cfg.init_from or any(s.init_from for s in model_cfg.towers.values())):
        return
    try:
        apply_init_from(model, model_cfg, log=lambda line: print(f"medfm: {line}", flush=True),
                        broadcast=collectives.broadcast_object)
    except InitFromError as exc:
        raise ConfigError(str(exc)) from None


class Engine:
    """Build the model + objectives + optimizer + schedule for ``cfg`` and wrap them in the chosen strategy."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.strategy = cfg.train.strategy
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.dtype = precision.compute_dtype(cfg.train.precision)
        self.micro_step = 0
        self.ds_config = deepspeed_config(cfg, world_size) if self.strategy == "zero3" else None
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.module = self._build()
        opt = torch.optim.AdamW(param_groups(self.module, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                # DDP: one fused kernel per tensor (CPU and CUDA) instead of ~10 foreach ops;
                                # DeepSpeed steps the client optimizer on its own flat partitions.
                                **({"fused": True} if self.strategy == "ddp" else {"foreach": True}))
        o, steps = cfg.optim, cfg.train.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, o.warmup_steps, steps, o.min_lr_ratio))
        if self.strategy == "zero3":
            import deepspeed
            import deepspeed.ops

            if self.device.type == "cpu":  # gloo does the collectives; skip the shm-comm op's 35 s JIT build
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.module, optimizer=opt, lr_scheduler=sched, config=self.ds_config,
                dist_init_required=False)
            self.wrapped = self.ds
        else:
            self.module.to(self.device)
            self.optimizer, self.scheduler = opt, sched
            self.wrapped = (nn.parallel.DistributedDataParallel(self.module, find_unused_parameters=True)
                            if world_size > 1 else self.module)
        torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank randomness (MAE masks) from here on

    # -- construction ----------------------------------------------------------------------------------------
    def _build(self) -> PretrainModule:
        from medfm.model_zoo import build_multimodal

        zero_init = self.strategy == "zero3" and self.cfg.zero.zero_init
        if zero_init:
            import deepspeed

            # zero.Init validates the batch arithmetic against deepspeed.comm's world size, which is 1 until
            # deepspeed.comm wraps the torch process group that init_distributed() made.
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                       dist_init_required=False)
            if "text" in self.cfg.model.towers:
                # Importing transformers' modeling code under zero.Init fails (it checks torch.Tensor.__new__,
                # which zero.Init patches): import it first.
                import transformers.modeling_utils  # noqa: F401
            # dtype comes from the ds config (DeepSpeed 0.19.8 ignores an explicit dtype on CPU and picks bf16).
            # mem_efficient_linear=False: otherwise zero.Init replaces torch.nn.functional.linear process-wide.
            ctx = deepspeed.zero.Init(config_dict_or_path=self.ds_config, mem_efficient_linear=False)
        else:
            ctx = nullcontext()
        with ctx:
            model = build_multimodal(self.cfg.model)
        init_pretrained(model, self.cfg.model)
        for tower in self.cfg.train.grad_checkpointing:
            model.towers[tower].set_grad_checkpointing(True)
        if self.cfg.train.compile:  # in place: state_dict keys (checkpoints, release) stay the same
            for tower in model.towers.values():
                tower.compile()
        # Objective-owned modules (a transformers LM, projectors) are built outside zero.Init: from_pretrained
        # must see whole tensors to load them; deepspeed.initialize partitions them right after.
        objectives = [build_objective(o, model) for o in self.cfg.objectives]
        module = PretrainModule(model, objectives)
        if self.strategy == "zero3":
            import deepspeed

            # ZeRO-3 gathers a module's own parameters in *its* forward hook. The contrastive scalars and the
            # towers' direct parameters (cls token, position/lead embeddings) are also read outside those
            # forwards (losses, ``forward_masked``), so they are gathered for the whole PretrainModule forward.
            for owner in [model, *model.towers.values()]:
                for p in owner.parameters(recurse=False):
                    deepspeed.zero.register_external_parameter(module, p)
        return module  # DDP bf16 keeps fp32 parameters (master weights) and computes under autocast (precision.py)

    # -- one micro-step --------------------------------------------------------------------------------------
    @property
    def grad_accum(self) -> int:
        return self.cfg.grad_accum(self.world_size)  # train.grad_accum, or derived when 0 (RunConfig owns the rule)

    def is_boundary(self) -> bool:
        return (self.micro_step + 1) % self.grad_accum == 0

    def to_device(self, batch: dict) -> dict:
        return precision.batch_to_device(batch, self.device, self.dtype)

    def forward(self, batch: dict, plan=None):
        """(losses dict, weighted total, tokens per modality) of one micro-batch."""
        batch = self.to_device(batch)
        cast = precision.autocast(self.device, self.dtype) if self.strategy == "ddp" else nullcontext()
        if self.strategy == "ddp" and self.world_size > 1 and not self.is_boundary():
            with self.wrapped.no_sync(), cast:
                return self.wrapped(batch, plan)
        with cast:
            return self.wrapped(batch, plan)

    def backward(self, total: torch.Tensor) -> None:
        if self.strategy == "zero3":
            self.ds.backward(total)
            return
        ctx = self.wrapped.no_sync() if (self.world_size > 1 and not self.is_boundary()) else nullcontext()
        with ctx:
            (total / self.grad_accum).backward()

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the accumulated gradient per group (towers, decoders, heads...). Call at the boundary,
        after the last backward and before ``step``. A collective under ZeRO-3 (each rank holds a partition)."""
        groups: dict[str, int] = {}
        sq = []
        if self.strategy == "zero3":
            from deepspeed.utils import safe_get_local_grad
        for name, p in self.module.named_parameters():
            key = param_group_name(name)
            g = safe_get_local_grad(p) if self.strategy == "zero3" else p.grad
            idx = groups.setdefault(key, len(groups))
            while len(sq) <= idx:
                sq.append(0.0)
            if g is not None:
                sq[idx] += float(g.detach().float().pow(2).sum())
        if self.strategy == "zero3":  # disjoint partitions: squared norms add up (DDP grads are already reduced)
            sq = collectives.reduce_floats(sq)
        return {k: math.sqrt(sq[i]) for k, i in groups.items()}

    def step(self, skip: bool = False) -> None:
        """Finish a micro-step; at the accumulation boundary apply (or, with ``skip``, discard) the update.

        Under ZeRO-3 a skipped step has had its backward made NaN by the caller: DeepSpeed then finds the global
        gradient norm invalid, drops the gradients and does not advance the LR schedule (stage3.step)."""
        boundary = self.is_boundary()
        if self.strategy == "zero3":
            self.ds.step()
            if boundary:
                clear_zero3_grad_buffer(self.ds)
        elif boundary:
            if skip:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                if self.cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- memory / inspection ---------------------------------------------------------------------------------
    def local_param_bytes(self) -> int:
        """Bytes of parameters this rank holds between steps (its ZeRO-3 partition, or everything under DDP)."""
        total = 0
        for p in self.module.parameters():
            t = getattr(p, "ds_tensor", None) if self.strategy == "zero3" else None
            t = p.data if t is None else t
            total += t.numel() * t.element_size()
        return total

    def full_param_bytes(self) -> int:
        return sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) * p.element_size()
                   for p in self.module.parameters())

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the live model (a collective under ZeRO-3; every rank gets them)."""
        if self.strategy != "zero3":
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()
                    if v.is_floating_point()}
        import deepspeed

        out = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().cpu().clone()
        persistent = set(self.module.state_dict())  # non-persistent buffers are not part of any checkpoint
        for name, b in self.module.named_buffers():
            if name in persistent:
                out[name] = b.detach().float().cpu().clone()
        return out

    def describe(self) -> str:
        return json.dumps({"strategy": self.strategy, "world_size": self.world_size, "precision":
                           self.cfg.train.precision, "params": sum(int(torch.Size(getattr(p, "ds_shape", p.shape))
                                                                      .numel()) for p in self.module.parameters())})


def clear_zero3_grad_buffer(ds_engine) -> None:
    """Zero DeepSpeed ZeRO-3's flat gradient-partition buffer after an optimizer step.

    DeepSpeed 0.19.8 (stage3 ``independent_gradient_partition_epilogue``) hands the optimizer every parameter's
    slice of that buffer, but only overwrites the slices of parameters that received a gradient this step. With a
    step plan, towers that did not run in a step (another modality group) were therefore updated again with their
    last step's gradients (also counted in the clipping norm; a NaN-skipped step's gradients stayed too). A resumed
    run starts from a zero buffer, so it diverged from the uninterrupted run at the first step that skipped a tower
    (issue #17). Zeroed, a tower that did not run has a zero gradient in every run.
    """
    buf = getattr(getattr(ds_engine, "optimizer", None), "grad_partitions_flat_buffer", None)
    if torch.is_tensor(buf):
        buf.zero_()
