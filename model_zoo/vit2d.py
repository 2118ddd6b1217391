"""2D Vision Transformer tower (ViT / MAE encoder) for radiographs, pathology tiles and other images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from medfm.model_zoo.layers import check_encoder_config, encoder_blocks, init_patch_proj, init_weights_mae, run_blocks
from medfm.model_zoo.masking import random_masking
from medfm.model_zoo.posemb import interpolate_grid, sincos_grid
from medfm.model_zoo.tower import Tower, masked_mean


@dataclass
class ViT2DConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: Literal["sincos", "learned"] = "sincos"
    pool: Literal["cls", "gap"] = "cls"
    class_token: bool = True
    num_registers: int = 0
    drop_path: float = 0.0
    layer_scale: float | None = None
    attn_backend: str = "auto"
    grad_checkpointing: bool = False

    def validate(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=true")
        check_encoder_config(self)


class ViT2D(Tower):
    modality = "image"
    batch_keys = ("image",)

    def __init__(self, cfg: ViT2DConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.width = cfg.width
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.grid = (cfg.img_size // cfg.patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.width)) if cfg.num_registers else None
        self.num_prefix_tokens = int(cfg.class_token) + cfg.num_registers
        n = self.grid[0] * self.grid[1]
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.width))
        else:  # fixed, recomputed for any grid, so not part of the weights
            self.register_buffer("pos_embed", sincos_grid(cfg.width, self.grid)[None], persistent=False)
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.grad_checkpointing = cfg.grad_checkpointing
        self._init()

    def _init(self):
        init_weights_mae(self)
        init_patch_proj(self.patch_embed.proj)
        for p in (self.cls_token, self.reg_token):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        if self.cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # -- shapes ---------------------------------------------------------------------------------------------------
    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not a multiple of patch_size {p}")
        return h // p, w // p

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C] (MAE order: row-major patches, pixels then channels)."""
        self.grid_size(x)
        p = self.patch_size
        return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        gh, gw = grid or self.grid
        p = self.patch_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p)

    def _pos(self, grid, dtype, device) -> torch.Tensor:
        if self.cfg.pos_embed == "learned":
            return interpolate_grid(self.pos_embed, self.grid, grid)
        if tuple(grid) == self.grid:
            return self.pos_embed.to(dtype)
        return sincos_grid(self.width, grid)[None].to(device=device, dtype=dtype)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"image tower expects [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        grid = self.grid_size(x)
        tokens = rearrange(self.patch_embed.proj(x), "b c h w -> b (h w) c")
        return tokens + self._pos(grid, tokens.dtype, tokens.device)

    def _prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = []
        b = tokens.shape[0]
        if self.cls_token is not None:
            parts.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(b, -1, -1))
        return torch.cat(parts + [tokens], dim=1) if parts else tokens

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, **masks) -> torch.Tensor:
        tokens = self._prefix(self._embed(x))
        tokens = run_blocks(self.blocks, tokens, self.grad_checkpointing)
        return self.norm(tokens)

    def forward_masked(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None, **masks):
        tokens = self._embed(x)
        kept, mask, ids_restore, _ = random_masking(tokens, mask_ratio, generator)
        latent = run_blocks(self.blocks, self._prefix(kept), self.grad_checkpointing)
        return self.norm(latent), mask, ids_restore

    def pool(self, tokens: torch.Tensor, **masks) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        return masked_mean(tokens[:, self.num_prefix_tokens :], None)
