"""3D Vision Transformer tower for CT / MR volumes, with per-axis patch sizes for anisotropic voxels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from medfm.model_zoo.layers import (
    check_encoder_config,
    encoder_blocks,
    init_patch_proj,
    init_weights_mae,
    run_blocks,
)
from medfm.model_zoo.masking import random_masking
from medfm.model_zoo.posemb import interpolate_grid, sincos_grid
from medfm.model_zoo.tower import Tower, masked_mean


@dataclass
class ViT3DConfig:
    img_size: tuple[int, int, int] = (96, 96, 96)  # D, H, W (array axis order of the shard volume)
    patch_size: tuple[int, int, int] = (16, 16, 16)
    in_chans: int = 1
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: Literal["sincos", "learned"] = "sincos"
    pool: Literal["cls", "gap"] = "cls"
    drop_path: float = 0.0
    layer_scale: float | None = None
    attn_backend: str = "auto"
    grad_checkpointing: bool = False

    def validate(self):
        for axis, (s, p) in enumerate(zip(self.img_size, self.patch_size)):
            if p <= 0 or s % p:
                raise ValueError(f"img_size[{axis}]={s} is not a multiple of patch_size[{axis}]={p}")
        check_encoder_config(self)


class ViT3D(Tower):
    modality = "volume"
    batch_keys = ("volume",)
    num_prefix_tokens = 1

    def __init__(self, cfg: ViT3DConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.width = cfg.width
        self.in_chans = cfg.in_chans
        self.patch_size = tuple(cfg.patch_size)
        self.grid = tuple(s // p for s, p in zip(cfg.img_size, cfg.patch_size))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(cfg.in_chans, cfg.width, self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        n = math.prod(self.grid)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.width))
        else:
            self.register_buffer("pos_embed", sincos_grid(cfg.width, self.grid)[None], persistent=False)
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.grad_checkpointing = cfg.grad_checkpointing
        init_weights_mae(self)
        init_patch_proj(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        if cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def grid_size(self, x: torch.Tensor) -> tuple[int, int, int]:
        shape = x.shape[-3:]
        for axis, (s, p) in enumerate(zip(shape, self.patch_size)):
            if s % p:
                raise ValueError(f"volume axis {axis} has {s} voxels, not a multiple of patch_size {p}")
        return tuple(s // p for s, p in zip(shape, self.patch_size))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, D, H, W] -> [B, N, pd*ph*pw*C]."""
        self.grid_size(x)
        pd, ph, pw = self.patch_size
        return rearrange(x, "b c (d x) (h y) (w z) -> b (d h w) (x y z c)", x=pd, y=ph, z=pw)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        gd, gh, gw = grid or self.grid
        pd, ph, pw = self.patch_size
        return rearrange(
            patches, "b (d h w) (x y z c) -> b c (d x) (h y) (w z)", d=gd, h=gh, w=gw, x=pd, y=ph, z=pw
        )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"volume tower expects [B, {self.in_chans}, D, H, W], got {tuple(x.shape)}")
        grid = self.grid_size(x)
        tokens = rearrange(self.patch_embed.proj(x), "b c d h w -> b (d h w) c")
        if self.cfg.pos_embed == "learned":
            pos = interpolate_grid(self.pos_embed, self.grid, grid)
        elif grid == self.grid:
            pos = self.pos_embed.to(tokens.dtype)
        else:
            pos = sincos_grid(self.width, grid)[None].to(device=tokens.device, dtype=tokens.dtype)
        return tokens + pos

    def forward(self, x: torch.Tensor, **masks) -> torch.Tensor:
        tokens = self._embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.norm(run_blocks(self.blocks, tokens, self.grad_checkpointing))

    def forward_masked(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None, **masks):
        tokens = self._embed(x)
        kept, mask, ids_restore, _ = random_masking(tokens, mask_ratio, generator)
        kept = torch.cat([self.cls_token.expand(kept.shape[0], -1, -1), kept], dim=1)
        return self.norm(run_blocks(self.blocks, kept, self.grad_checkpointing)), mask, ids_restore

    def pool(self, tokens: torch.Tensor, **masks) -> torch.Tensor:
        return tokens[:, 0] if self.cfg.pool == "cls" else masked_mean(tokens[:, 1:], None)
