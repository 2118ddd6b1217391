"""The bf16 policy, written once: which batch tensors are cast, and how each strategy computes in bf16.

Cast: the modality *values* a tower's first layer (patch / conv embedding) consumes — pixels, HU voxels, signal
samples. They are bounded, already quantised at shard time (uint8/uint16/int16/float16), and halving their bytes
halves the host-to-device copy.

Never cast: everything else — EHR event times (days relative to the index event: -1000.3 in bf16 is -1000.0, and
the 1-hour sin/cos feature of that time goes from -0.951 to -0.006) and numeric EHR values (lab results), token /
code ids, validity masks, present flags, labels. Towers turn these into features in fp32 and cast the *features*
to their weights' dtype (``model_zoo.ehr.EHRTransformer.embed_events``).

Strategies: ZeRO-3 bf16 is DeepSpeed's (bf16 weights and activations, fp32 master weights and optimizer state in
its partitions). DDP bf16 is ``torch.autocast`` over fp32 parameters: the optimizer updates fp32 master weights,
the matmuls run in bf16 — the same split as ZeRO-3, never a module cast to bf16 before the optimizer is built.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

CAST_KEYS = ("image", "volume", "signal")


def compute_dtype(precision: str) -> torch.dtype:
    """``train.precision`` -> the dtype the forward computes in."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def batch_to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Every tensor of ``batch`` on ``device``; only the floating :data:`CAST_KEYS` values in ``dtype``."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if k in CAST_KEYS and v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        out[k] = v
    return out


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's autocast context for the DDP strategy (a no-op in fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
