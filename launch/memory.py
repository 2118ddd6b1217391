"""Per-device memory for ZeRO-3 model states (parameters, gradients, optimizer states), before a run starts.

The formula is DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (deepspeed.runtime.zero.stage3), re-derived
so a dry run needs neither a DeepSpeed import nor the model's weights, and tested against DeepSpeed's function:

* no offload: every device holds 1/world of 18 bytes per parameter (16-bit param + grad, fp32 master param,
  Adam m and v, plus DeepSpeed's fp32 gradient-partition headroom) plus one gathered layer (4 bytes/param);
* ``offload_optimizer``: 2 bytes/param/world on the device, 16 (zero.Init) bytes/param/node on the host;
* ``offload_optimizer`` + ``offload_params``: only the gathered layer on the device, 18 bytes/param/node on the host.

On top of the model states, ``estimate_memory`` adds what a training step holds per device:

* activations saved for backward, per micro-batch, counted analytically from the model config and the collate
  shapes (``block_activation_bytes``; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 2: sbh(34 + 5as/h) bytes per layer in 16-bit with dropout, generalised to the run's
  element size, MLP ratio, dropout on/off and fused attention);
* the ZeRO-3 working set set by the DeepSpeed config (pretrain/ds_config.py): gathered parameters up to
  ``stage3_max_live_parameters`` + ``stage3_prefetch_bucket_size`` (never more than the model), and the
  ``reduce_bucket_size`` gradient bucket, in the run's dtype; and the optimizer step's fp32 temporary (torch
  AdamW foreach: 4 bytes per partition element, ``adamw_step_temporary``);
* a stated process baseline: the CUDA context on a GPU (not measured here), the torch + DeepSpeed + transformers
  import RSS on CPU (measured by benchmarks/zero3_large.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


@dataclass
class ModelSize:
    total_params: int
    largest_layer_params: int
    largest_layer: str
    how: str  # "meta" (built without weights) or "cpu" (materialised)


@dataclass
class Zero3Estimate:
    device_bytes: int
    host_bytes: int
    largest_layer_bytes: int
    offload_optimizer: bool
    offload_params: bool
    zero_init: bool


def zero3_model_states(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                       offload_optimizer: bool = False, offload_params: bool = False, zero_init: bool = True,
                       additional_buffer_factor: float = 1.5) -> Zero3Estimate:
    """Bytes per device (GPU) and per host (CPU) for ZeRO-3 model states; same numbers as DeepSpeed's estimator
    (where ``offload_params`` without ``offload_optimizer`` is not a DeepSpeed option and is treated as no offload)."""
    total_gpus = num_nodes * num_gpus_per_node
    per_node = 1 / num_nodes
    layer = 4 * largest_layer_params
    if offload_optimizer and offload_params:
        device = layer
        host_per_param = 18 * per_node if zero_init else max(4 * num_gpus_per_node, 18 * per_node)
        host = total_params * host_per_param * additional_buffer_factor
    elif offload_optimizer:
        device = layer + int(2 * total_params / total_gpus)
        host_per_param = 16 * per_node if zero_init else max(4 * num_gpus_per_node, 16 * per_node)
        host = total_params * host_per_param * additional_buffer_factor
    else:
        device = layer + int(18 * total_params / total_gpus)
        host = (largest_layer_params if zero_init else total_params) * 4 * num_gpus_per_node * additional_buffer_factor
    return Zero3Estimate(int(device), int(host), layer, offload_optimizer, offload_optimizer and offload_params,
                         zero_init)


def count_model(cfg) -> ModelSize:
    """Parameter count and the largest single module's own parameters for the run's full trainable module (model
    towers, heads, decoders and objective-owned modules), built on the meta device so nothing is allocated.

    Falls back to a real CPU build when a component cannot be built on meta (e.g. a local HF checkpoint)."""
    import torch

    from medfm.model_zoo import build_multimodal
    from medfm.pretrain.objectives import PretrainModule, build_objective

    def build():
        model = build_multimodal(cfg.model)
        return PretrainModule(model, [build_objective(o, model) for o in cfg.objectives])

    try:
        with torch.device("meta"):
            module, how = build(), "meta"
    except Exception:  # noqa: BLE001 - any meta-device incompatibility; the CPU build is exact
        module, how = build(), "cpu"
    seen, total = set(), 0
    for p in module.parameters():  # ids, not data_ptr: every meta tensor has data_ptr 0
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    largest, largest_name = 0, ""
    for name, m in module.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > largest:
            largest, largest_name = n, name
    return ModelSize(total, largest, largest_name, how)


def _gib(n: float) -> str:
    """Human size, fixed width (tiny CPU models would otherwise all print 0.00 GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:8.2f} {unit}"
    return f"{n:8.0f} B  "


def format_estimate(size: ModelSize, nproc_per_node: int, nnodes: int, zero, cfg=None, device: str = "cuda") -> str:
    """The dry run's memory table: the run's own offload choice first, then the alternatives; with ``cfg``, the
    per-device breakdown (model states, activations, ZeRO-3 buffers, baseline, total) of the run's own choice."""
    lines = [f"model: {size.total_params:,} parameters; largest layer {size.largest_layer or '<root>'} "
             f"{size.largest_layer_params:,} parameters (counted on {size.how})",
             f"ZeRO-3 model states over {nnodes} node(s) x {nproc_per_node} device(s) (model states only):",
             "   per device |    per host | options"]
    options = [(zero.offload_optimizer, zero.offload_params), (False, False), (True, False), (True, True)]
    done = set()
    for i, (oo, op) in enumerate(options):
        key = (oo, oo and op)
        if key in done:
            continue
        done.add(key)
        est = zero3_model_states(size.total_params, size.largest_layer_params, nproc_per_node, nnodes,
                                 offload_optimizer=oo, offload_params=op, zero_init=zero.zero_init)
        tag = "  <- this config" if i == 0 else ""
        lines.append(f" {_gib(est.device_bytes)} | {_gib(est.host_bytes)} | offload_optimizer={str(oo).lower()}, "
                     f"offload_params={str(oo and op).lower()}, zero_init={str(zero.zero_init).lower()}{tag}")
    if cfg is not None:
        lines.append(format_breakdown(estimate_memory(cfg, size, nproc_per_node, nnodes, device), cfg))
    return "\n".join(lines)


# Process baseline per rank. CPU: RSS of a process that imported torch, deepspeed, transformers and medfm's trainer
# (benchmarks/zero3_large.py measures it at every worker start: 0.37 GiB on 2026-12-01, torch 2.13 / DeepSpeed 0.19.8).
# GPU: the CUDA context + cuBLAS workspace, typically 0.3-0.6 GiB with lazy module loading; stated, not measured
# here (no GPU in CI) -- nvidia-smi's per-process memory of an idle `torch.zeros(1, device="cuda")` gives it.
BASELINE_BYTES = {"cpu": int(0.36 * 2**30), "cuda": int(0.5 * 2**30)}


def block_activation_bytes(tokens: int, width: int, heads: int, mlp_hidden: int, micro_batch: int, elem: int,
                           hidden_dropout: bool = False, attn_dropout: bool = False) -> int:
    """Bytes one pre-norm transformer block saves for backward (s = tokens, b = micro_batch, h = width, a = heads,
    e = bytes per element of the run's dtype).

    Korthikanti et al. 2022 count, per layer in 16-bit: 2 LayerNorm inputs (4sbh), attention QKV input + Q, K, V
    + output-projection input (10sbh), softmax output + attention-dropout mask and output (5as^2b), MLP fc1 input +
    GeLU input + fc2 input (2sbh + 16sbh), two dropout masks (2sbh) = sbh(34 + 5as/h). Here each e-byte tensor is
    e*sbh (fc1/GeLU/fc2 with the real MLP width), a dropout mask is 1 byte per element and only counted when that
    dropout is on, and without attention dropout the fused SDPA kernels (flash / memory-efficient, what
    model_zoo.attention and HF SDPA use) save their output plus an fp32 logsumexp (4as b) instead of the s x s
    probabilities."""
    s, b, h, a, e = tokens, micro_batch, width, heads, elem
    sbh, sbm = s * b * h, s * b * mlp_hidden
    per = e * (2 * sbh + 5 * sbh)  # norm1/norm2 inputs; qkv input, q, k, v, proj input
    per += e * (sbh + 2 * sbm)  # fc1 input, GeLU input, fc2 input
    if hidden_dropout:
        per += 2 * sbh
    if attn_dropout:  # math path: probabilities, dropout mask, dropped probabilities
        per += a * s * s * b * (e + 1 + e)
    else:  # fused kernel: its output (the projection reads a reshaped copy) + fp32 logsumexp
        per += e * sbh + 4 * a * s * b
    return per


@dataclass
class Stack:
    """One run of transformer blocks in a step: ``tokens`` per sample through ``depth`` blocks."""
    name: str
    tokens: int
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    hidden_dropout: bool = False
    attn_dropout: bool = False
    checkpointed: bool = False

    def bytes(self, micro_batch: int, elem: int) -> int:
        one = block_activation_bytes(self.tokens, self.width, self.heads, self.mlp_hidden, micro_batch, elem,
                                     self.hidden_dropout, self.attn_dropout)
        if self.checkpointed:  # each block keeps its input; one block's activations live again in its backward
            return self.depth * elem * self.tokens * micro_batch * self.width + one
        return self.depth * one


def _patches(modality: str, tcfg, collate) -> tuple[int, int]:
    """(patch tokens, prefix tokens) of one sample from the collate shapes (``input_collate``: the tower's input where
    the collate leaves the size unset)."""
    if modality == "image":
        h, w = collate.image_size
        return (h // tcfg.patch_size) * (w // tcfg.patch_size), int(tcfg.class_token) + tcfg.num_registers
    if modality == "volume":
        size = collate.volume_size
        return math.prod(d // p for d, p in zip(size, tcfg.patch_size)), 1
    if modality == "signal":
        return math.ceil((collate.signal_length or tcfg.max_len) / tcfg.patch_size), 1
    if modality == "ehr":
        return collate.ehr_max_events, 1
    raise ValueError(f"no token count for modality {modality!r}")


def _text_dims(tcfg) -> tuple[int, int, int, int, bool, bool]:
    """(width, depth, heads, mlp hidden, hidden dropout, attention dropout) of a text tower: the HF config.json of
    its ``path`` when it has one (what TextTower builds), else its own fields (BERT dropout 0.1 by default)."""
    hidden, attn = 0.1, 0.1
    dims = (tcfg.width, tcfg.depth, tcfg.num_heads, tcfg.intermediate_size)
    if tcfg.path:
        from medfm.model_zoo.text import resolve_local_dir

        hf = json.loads((resolve_local_dir(tcfg.path) / "config.json").read_text())
        dims = (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"])
        hidden, attn = hf.get("hidden_dropout_prob", hidden), hf.get("attention_probs_dropout_prob", attn)
    over = tcfg.dropout_overrides()
    hidden, attn = over.get("hidden_dropout_prob", hidden), over.get("attention_probs_dropout_prob", attn)
    return (*dims, hidden > 0, attn > 0)


def activation_stacks(cfg) -> list[Stack]:
    """The transformer stacks one training micro-step runs, from the model config, objectives and collate shapes:
    a tower's full forward when a non-MAE objective reads it (contrastive, caption, ... share one cached encode),
    the MAE encoder on its unmasked tokens plus the MAE decoder on all tokens, the text tower at text_max_tokens,
    the caption decoder at text_max_tokens."""
    from medfm.model_zoo.input_sizes import input_collate
    from medfm.model_zoo.registry import model_config
    from medfm.pretrain.objectives import DEFAULT_MASK_RATIO

    collate, ckpt = input_collate(cfg.model, cfg.data.collate), set(cfg.train.grad_checkpointing)
    mae_ratio, full = {}, set()
    for o in cfg.objectives:
        kind, _, mods = o.name.partition(":")
        if kind == "mae":
            mae_ratio[mods] = o.mask_ratio if o.mask_ratio is not None else DEFAULT_MASK_RATIO[mods]
        else:
            full.update(m for m in mods.replace("-", ",").split(",") if m)
    stacks = []
    for m, spec in cfg.model.towers.items():
        tcfg = model_config(spec.arch, **spec.overrides)
        if m == "text":
            w, d, a, hid, hdrop, adrop = _text_dims(tcfg)
            if m in full:
                stacks.append(Stack("text", collate.text_max_tokens, w, d, a, hid, hdrop, adrop, m in ckpt))
            continue
        n, prefix = _patches(m, tcfg, collate)
        w, d, a, hid = tcfg.width, tcfg.depth, tcfg.num_heads, int(tcfg.width * tcfg.mlp_ratio)
        if m in full:
            stacks.append(Stack(m, n + prefix, w, d, a, hid, checkpointed=m in ckpt))
        if m in mae_ratio:
            kept = prefix + int(n * (1 - mae_ratio[m]))  # model_zoo.masking keeps int(N * (1 - ratio))
            stacks.append(Stack(f"{m} MAE encoder", kept, w, d, a, hid, checkpointed=m in ckpt))
            dec = cfg.model.mae_decoder
            stacks.append(Stack(f"{m} MAE decoder", n + prefix, dec.width, dec.depth, dec.num_heads,
                                int(dec.width * dec.mlp_ratio)))
    cap = cfg.model.caption
    if cap.enabled and any(o.name.startswith("caption:") for o in cfg.objectives):
        stacks.append(Stack("caption decoder", min(collate.text_max_tokens, cap.max_len), cap.width, cap.depth,
                            cap.num_heads, int(cap.width * 4.0)))
    return stacks


def device_kind(env: dict) -> str:
    """"cpu" or "cuda": what the workers run on, read from their environment (launch.world.worker_env sets
    DS_ACCELERATOR=cpu where there is no GPU)."""
    return "cpu" if env.get("DS_ACCELERATOR") == "cpu" else "cuda"


def elem_bytes(cfg) -> int:
    return 2 if cfg.train.precision == "bf16" else 4


def zero3_buffers(zero, total_params: int, elem: int) -> dict[str, int]:
    """ZeRO-3's working set on a device beyond the partitions: gathered full parameters (DeepSpeed keeps up to
    stage3_max_live_parameters resident and prefetches stage3_prefetch_bucket_size more; never more than the model)
    and the gradient reduce bucket (reduce_bucket_size elements), all in the run's dtype."""
    live = min(zero.stage3_max_live_parameters + zero.stage3_prefetch_bucket_size, total_params)
    return {"gathered parameters": live * elem, "reduce bucket": zero.reduce_bucket_size * elem}


@dataclass
class MemoryBreakdown:
    """Per-device bytes of one training process; ``total`` is what preflight compares to zero.device_memory_gib."""
    model_states: int
    activations: dict[str, int] = field(default_factory=dict)
    zero3: dict[str, int] = field(default_factory=dict)
    baseline: int = 0
    device: str = "cuda"

    @property
    def total(self) -> int:
        return self.model_states + sum(self.activations.values()) + sum(self.zero3.values()) + self.baseline


def estimate_memory(cfg, size: ModelSize, nproc_per_node: int, nnodes: int, device: str = "cuda",
                    offload_optimizer: bool | None = None, offload_params: bool | None = None) -> MemoryBreakdown:
    """Everything one rank holds at its peak: model states (on CPU devices the host share is the same memory, so
    it is added per rank), activations of one micro-batch, the ZeRO-3 working set and the process baseline."""
    z = cfg.zero
    oo = z.offload_optimizer if offload_optimizer is None else offload_optimizer
    op = z.offload_params if offload_params is None else offload_params
    est = zero3_model_states(size.total_params, size.largest_layer_params, nproc_per_node, nnodes, oo, op,
                             z.zero_init)
    states = est.device_bytes + (est.host_bytes // nproc_per_node if device == "cpu" else 0)
    b, e = cfg.micro_batch, elem_bytes(cfg)
    acts = {s.name: s.bytes(b, e) for s in activation_stacks(cfg)}
    buffers = zero3_buffers(z, size.total_params, e)
    if device == "cpu" or not oo:  # offloaded, the step runs in host memory (not this device's)
        buffers["AdamW step temporary"] = adamw_step_temporary(size.total_params, nproc_per_node * nnodes)
    return MemoryBreakdown(states, acts, buffers, BASELINE_BYTES[device], device)


def adamw_step_temporary(total_params: int, world: int) -> int:
    """torch AdamW with ``foreach=True`` (pretrain/engine.py under ZeRO-3) allocates one fp32 tensor the size of the
    rank's partition for sqrt(v) in each step (torch/optim/adam.py ``_multi_tensor_adam``: ``_foreach_sqrt``);
    DeepSpeed's own estimator assumes its fused Adam, which needs none. Added after the first ViT-L measurement
    showed the step-time gap (benchmarks/RESULTS.md); derived from torch's source, not fitted."""
    return 4 * math.ceil(total_params / world)


def format_breakdown(mem: MemoryBreakdown, cfg) -> str:
    """The per-device breakdown the dry run prints (model states, activations, ZeRO-3 buffers, baseline, total)."""
    where = "device + host / ranks (CPU: the same memory)" if mem.device == "cpu" else "device"
    lines = [f"per-device estimate ({mem.device}, micro-batch {cfg.micro_batch}, {elem_bytes(cfg)}-byte "
             "activations; formulas: launch/memory.py):",
             f"  model states      {_gib(mem.model_states)}  ({where})"]
    lines.append(f"  activations       {_gib(sum(mem.activations.values()))}")
    lines += [f"    {name:<22}{_gib(n)}" for name, n in mem.activations.items()]
    lines.append(f"  ZeRO-3 buffers    {_gib(sum(mem.zero3.values()))}")
    lines += [f"    {name:<22}{_gib(n)}" for name, n in mem.zero3.items()]
    lines.append(f"  baseline          {_gib(mem.baseline)}  "
                 f"({'torch + deepspeed import RSS, measured' if mem.device == 'cpu' else 'CUDA context, stated'})")
    lines.append(f"  total             {_gib(mem.total)}")
    return "\n".join(lines)
