"""MAE decoders (2D, 3D, 1D): un-shuffle the kept latent tokens, fill mask tokens, predict every patch.

``forward(latent, ids_restore, grid=None, valid=None) -> pred [B, N, patch_dim]``. ``latent`` is the tower's
``forward_masked`` output (prefix tokens first). ``grid`` is the token grid of the input (the tower's
``grid_size(x)``); by default the tower's configured grid (or the only grid consistent with N in 1D / square 2D).
``valid`` (bool [B, N]) key-pads padded patches (variable-length signals).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medfm.model_zoo.layers import Block, init_weights_mae, run_blocks
from medfm.model_zoo.posemb import sincos_grid


class MAEDecoder(nn.Module):
    ndim = 0

    def __init__(
        self,
        encoder_width: int,
        patch_dim: int,
        grid: tuple[int, ...],
        num_prefix_tokens: int = 1,
        width: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if len(grid) != self.ndim:
            raise ValueError(f"{type(self).__name__} needs a {self.ndim}-D grid, got {grid}")
        self.grid = tuple(grid)
        self.patch_dim = patch_dim
        self.width = width
        self.num_prefix_tokens = num_prefix_tokens
        self.grad_checkpointing = False
        self.decoder_embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, backend=attn_backend) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, patch_dim)
        self.register_buffer("pos_embed", sincos_grid(width, self.grid)[None], persistent=False)
        init_weights_mae(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def mix_neighbours(self, full: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Hook on the un-shuffled grid tokens [B, N, width] before positions are added (identity here)."""
        return full

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def _grid_for(self, n: int) -> tuple[int, ...]:
        if n == math.prod(self.grid):
            return self.grid
        if self.ndim == 1:
            return (n,)
        if self.ndim == 2 and math.isqrt(n) ** 2 == n:
            return (math.isqrt(n),) * 2
        raise ValueError(f"{n} tokens do not fit the decoder grid {self.grid}; pass grid=tower.grid_size(x)")

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid: tuple[int, ...] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        grid = tuple(grid) if grid is not None else self._grid_for(n)
        if math.prod(grid) != n:
            raise ValueError(f"grid {grid} has {math.prod(grid)} cells but ids_restore has {n} tokens")
        p = self.num_prefix_tokens
        kept = x[:, p:]
        fill = self.mask_token.to(x.dtype).expand(b, n - kept.shape[1], -1)
        full = torch.cat([kept, fill], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, full.shape[-1]))
        full = self.mix_neighbours(full, valid)
        pos = self.pos_embed if grid == self.grid else sincos_grid(self.width, grid)[None].to(x.device)
        full = full + pos.to(x.dtype)
        x = torch.cat([x[:, :p], full], dim=1)
        kpm = None
        if valid is not None:
            kpm = torch.cat([torch.ones(b, p, dtype=torch.bool, device=x.device), valid.to(torch.bool)], dim=1)
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing, key_padding_mask=kpm)
        return self.decoder_pred(self.decoder_norm(x))[:, p:]


class MAEDecoder2D(MAEDecoder):
    ndim = 2


class MAEDecoder3D(MAEDecoder):
    ndim = 3


class MAEDecoder1D(MAEDecoder):
    """1-D decoder with a depthwise conv over the un-shuffled tokens before the blocks (``local_mix``).

    Why: a masked signal patch is predictable from its *neighbours* (ECG: the waveform on either side), not from
    anything global. Attention only finds the neighbours once its q/k weights have learnt to read the sin-cos
    positions, and until then the masked prediction is uncorrelated with every input, so MAE sits on the
    "predict the patch mean" saddle (normalised loss ~1.0 for hundreds of steps on real ECG, the tower's gradient
    ~0). The conv hands each mask token its neighbours' latents from step 0. Images/volumes do not need it: their
    masked patches correlate with global content that uniform attention already carries.
    """

    ndim = 1
    local_kernel = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.local_kernel
        self.local_mix = nn.Conv1d(self.width, self.width, k, padding=k // 2, groups=self.width)

    def mix_neighbours(self, full: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is not None:  # padded patches must not leak into real ones
            full = full * valid[..., None].to(full.dtype)
        return full + self.local_mix(full.transpose(1, 2)).transpose(1, 2)


def decoder_for(tower, width: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0,
                attn_backend: str = "auto") -> MAEDecoder:
    """The matching decoder for an MAE-capable tower (patch_dim and grid taken from the tower)."""
    grid = tuple(tower.grid)
    if tower.modality == "image":
        cls, patch_dim = MAEDecoder2D, tower.patch_size**2 * tower.in_chans
    elif tower.modality == "volume":
        cls, patch_dim = MAEDecoder3D, math.prod(tower.patch_size) * tower.in_chans
    elif tower.modality == "signal":
        cls, patch_dim = MAEDecoder1D, tower.patch_size * tower.n_leads
    else:
        raise ValueError(f"no MAE decoder for modality '{tower.modality}' (MAE towers: image, volume, signal)")
    return cls(tower.width, patch_dim, grid, tower.num_prefix_tokens, width, depth, num_heads, mlp_ratio, attn_backend)
