"""Read a training checkpoint (DeepSpeed ZeRO-3 partitions or DDP safetensors) into one fp32 state dict.

Read-only and free of training code, so evals and release can load checkpoints without importing medfm.pretrain
(dependency direction: evals -> {model_zoo, shards}). The layout is pretrain's (docs/INTERFACES.md):
``<ckpt_dir>/<tag>/`` with ``COMPLETE`` written last, ``<ckpt_dir>/latest`` naming the newest complete tag.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


@contextlib.contextmanager
def _weights_only_loads():
    """DeepSpeed's zero_to_fp32 loads partitions with weights_only disabled: a checkpoint handed to ``medfm eval``
    or ``medfm release`` could then run arbitrary code. Within this context every torch.load is forced to
    ``weights_only=True`` with exactly the DeepSpeed types its partition files hold allowlisted, so a file that
    needs anything else fails to load instead of executing it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            yield
    finally:
        torch.load = original


def latest_tag(checkpoint_dir) -> str:
    """The tag ``latest`` names, if that checkpoint is complete (ValueError, one line, otherwise)."""
    root = Path(checkpoint_dir)
    f = root / "latest"
    tag = f.read_text().strip() if f.is_file() else ""
    if not tag or not (root / tag / "COMPLETE").is_file():
        raise ValueError(f"checkpoint.resume=latest: no complete checkpoint under {root}")
    return tag


def consolidate(checkpoint_dir, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 state dict of the PretrainModule in checkpoint ``tag`` (default: the latest complete one) — keys carry the
    ``model.`` prefix (see ``model_state_dict``). ZeRO-3 partitions are merged with DeepSpeed's zero_to_fp32 (exact
    fp32 master weights) with every torch.load forced to weights_only (see ``_weights_only_loads``); a DDP
    checkpoint is safetensors, read directly."""
    root = Path(checkpoint_dir)
    if tag is None:
        tag = latest_tag(root)
    path = root / tag  # an explicit tag may also be a plain DeepSpeed checkpoint (no medfm COMPLETE marker)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def model_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MultiModalModel part of a PretrainModule state dict (keys without ``model.``) — what
    ``medfm.model_zoo.release`` and ``MultiModalModel.load_state_dict`` take."""
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
