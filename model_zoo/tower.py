"""What every tower shares: its modality, token width, prefix tokens, batch-key plumbing, pooling, checkpointing."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens [B, N, C] where valid [B, N] is True; rows without any valid token give zeros."""
    if valid is None:
        return tokens.mean(dim=1)
    w = valid.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class Tower(nn.Module):
    """Base class. Subclasses set ``modality``, ``width``, ``num_prefix_tokens`` and implement ``forward``.

    ``batch_inputs(batch)`` turns a loader batch (docs/INTERFACES.md "Loader batch") into ``(x, masks)`` so that
    ``tower(x, **masks)`` and ``tower.pool(tokens, **masks)`` work for every modality the same way.
    """

    modality: str = ""
    batch_keys: tuple[str, ...] = ()  # first is the input tensor, the rest are mask kwargs
    width: int
    num_prefix_tokens: int = 0

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory at ~30% more compute)."""
        self.grad_checkpointing = bool(enable)

    def batch_inputs(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.batch_keys[0] not in batch:
            raise KeyError(f"{self.modality} tower needs batch key '{self.batch_keys[0]}' (have {sorted(batch)})")
        masks = {k: batch[k] for k in self.batch_keys[1:] if k in batch and batch[k] is not None}
        return batch[self.batch_keys[0]], masks

    def token_valid(self, x: torch.Tensor, **masks) -> torch.Tensor | None:
        """Bool [B, N] validity of the non-prefix tokens (None = all valid)."""
        return None
