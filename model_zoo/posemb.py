"""Position embeddings: fixed sin-cos for 1D/2D/3D grids (MAE) and interpolation of learned tables to new grids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """[N] positions -> [N, dim] (sin | cos halves, as MAE's get_1d_sincos_pos_embed_from_grid)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega
    out = positions.double().flatten()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_grid(dim: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Fixed embedding [prod(grid), dim] for a 1D/2D/3D grid in row-major token order.

    Each axis gets an equal even share of the channels; leftover channels (dim not divisible by 2*len(grid)) are
    zero, so any width works.
    """
    naxes = len(grid)
    per_axis = (dim // (2 * naxes)) * 2
    if per_axis == 0:
        raise ValueError(f"width {dim} too small for a {naxes}-D sin-cos embedding")
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = [sincos_1d(per_axis, c.flatten()) for c in coords]
    # MAE 2D orders (w, h) halves: emb_h uses grid[0] which is the w index in their meshgrid; we keep axis order.
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb


def interpolate_grid(table: torch.Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...]) -> torch.Tensor:
    """Resample a learned table [1, prod(old_grid), C] to new_grid (bicubic in 2D, trilinear in 3D, linear in 1D)."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    n = len(old_grid)
    mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[n]
    axes = " ".join(f"g{i}" for i in range(n))
    sizes = {f"g{i}": g for i, g in enumerate(old_grid)}
    x = rearrange(table, f"1 ({axes}) c -> 1 c {axes}", **sizes)
    x = F.interpolate(x.float(), size=tuple(new_grid), mode=mode, align_corners=False).to(table.dtype)
    return rearrange(x, f"1 c {axes} -> 1 ({axes}) c")
