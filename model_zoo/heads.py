"""Projection heads from a tower's pooled features into the shared embedding space (CLIP / SigLIP style)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from medfm.model_zoo.layers import whole_params


class ProjectionHead(nn.Module):
    """``linear``: one bias-free projection (CLIP). ``mlp``: Linear-GELU-Linear (SimCLR/ALIGN-style)."""

    def __init__(self, in_dim: int, embed_dim: int, kind: Literal["linear", "mlp"] = "linear", hidden: int | None = None):
        super().__init__()
        if kind == "linear":
            self.proj = nn.Linear(in_dim, embed_dim, bias=False)
            with whole_params([self.proj.weight]):  # partitioned already under deepspeed.zero.Init
                nn.init.normal_(self.proj.weight, std=in_dim**-0.5)
        elif kind == "mlp":
            hidden = hidden or max(in_dim, embed_dim)
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
            for m in self.proj:
                if isinstance(m, nn.Linear):
                    with whole_params(m.parameters()):
                        nn.init.trunc_normal_(m.weight, std=0.02)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
        else:
            raise ValueError(f"projection head kind: expected 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
