"""Per-device memory for ZeRO-3 model states (parameters, gradients, optimizer states), before a run starts.

The formula is DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (deepspeed.runtime.zero.stage3), re-derived
so a dry run needs neither a DeepSpeed import nor the model's weights, and tested against DeepSpeed's function:

* no offload: every device holds 1/world of 18 bytes per parameter (16-bit param + grad, fp32 master param,
  Adam m and v, plus DeepSpeed's fp32 gradient-partition headroom) plus one gathered layer (4 bytes/param);
* ``offload_optimizer``: 2 bytes/param/world on the device, 16 (zero.Init) bytes/param/node on the host;
* ``offload_optimizer`` + ``offload_params``: only the gathered layer on the device, 18 bytes/param/node on the host.

Activations are not included (they depend on batch, sequence length and checkpointing); the dry run says so.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def format_estimate(size: ModelSize, nproc_per_node: int, nnodes: int, zero) -> str:
    """The dry run's memory table: the run's own offload choice first, then the alternatives."""
    lines = [f"model: {size.total_params:,} parameters; largest layer {size.largest_layer or '<root>'} "
             f"{size.largest_layer_params:,} parameters (counted on {size.how})",
             f"ZeRO-3 model states over {nnodes} node(s) x {nproc_per_node} device(s) (activations not included):",
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
    return "\n".join(lines)
