"""1D transformer tower for ECG / EEG: leads as input channels, patch tokenisation along time.

Missing leads: the loader's ``signal_leads`` [B, L] marks leads that exist. A missing lead is zeroed in the input
*and* announced by adding its learned ``lead_missing`` embedding to every token, so a flat line and an absent lead
look different to the model. Variable length: ``signal_valid`` [B, T] marks real samples; patches without any real
sample are key-padded in attention, excluded from pooling and dropped first by MAE masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
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
from medfm.model_zoo.posemb import sincos_grid
from medfm.model_zoo.tower import Tower, masked_mean


@dataclass
class SignalConfig:
    n_leads: int = 12
    patch_size: int = 50  # samples per token (100 ms at 500 Hz)
    max_len: int = 5000  # samples the MAE decoder's default grid assumes (10 s at 500 Hz); inputs may be shorter/longer
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool: Literal["cls", "mean"] = "mean"
    drop_path: float = 0.0
    layer_scale: float | None = None
    attn_backend: str = "auto"
    grad_checkpointing: bool = False

    def validate(self):
        if self.n_leads < 1 or self.patch_size < 1:
            raise ValueError("n_leads and patch_size must be positive")
        check_encoder_config(self)


class SignalTransformer(Tower):
    modality = "signal"
    batch_keys = ("signal", "signal_valid", "signal_leads")
    num_prefix_tokens = 1

    def __init__(self, cfg: SignalConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.width = cfg.width
        self.patch_size = cfg.patch_size
        self.n_leads = cfg.n_leads
        self.grid = (-(-cfg.max_len // cfg.patch_size),)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv1d(cfg.n_leads, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.lead_missing = nn.Parameter(torch.zeros(cfg.n_leads, cfg.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.grad_checkpointing = cfg.grad_checkpointing
        init_weights_mae(self)
        init_patch_proj(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.lead_missing, std=0.02)

    # -- shapes ---------------------------------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor, signal_valid: torch.Tensor | None):
        """Right-pad time to a multiple of patch_size; the pad is marked invalid."""
        if x.dim() != 3 or x.shape[1] != self.n_leads:
            raise ValueError(f"signal tower expects [B, {self.n_leads}, T], got {tuple(x.shape)}")
        t = x.shape[-1]
        pad = (-t) % self.patch_size
        if signal_valid is not None and tuple(signal_valid.shape) != (x.shape[0], t):
            raise ValueError(f"signal_valid: expected shape [{x.shape[0]}, {t}], got {tuple(signal_valid.shape)}")
        if pad:
            x = F.pad(x, (0, pad))
            if signal_valid is None:
                signal_valid = torch.ones(x.shape[0], t, dtype=torch.bool, device=x.device)
            signal_valid = F.pad(signal_valid.to(torch.bool), (0, pad), value=False)
        return x, signal_valid

    def grid_size(self, x: torch.Tensor) -> tuple[int]:
        return (-(-x.shape[-1] // self.patch_size),)

    def patchify(self, x: torch.Tensor, signal_valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, T] -> [B, N, p*L] (time-major inside a patch); T is zero-padded to a multiple of p and samples
        outside ``signal_valid`` are zeroed, exactly as the encoder sees them."""
        x, valid = self._pad(x, signal_valid)
        if valid is not None:
            x = x * valid[:, None, :].to(x.dtype)
        return rearrange(x, "b l (n p) -> b n (p l)", p=self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return rearrange(patches, "b n (p l) -> b l (n p)", p=self.patch_size, l=self.n_leads)

    def token_valid(self, x: torch.Tensor, signal_valid=None, **masks) -> torch.Tensor | None:
        _, valid = self._pad(x, signal_valid)
        if valid is None:
            return None
        return rearrange(valid.to(torch.bool), "b (n p) -> b n p", p=self.patch_size).any(dim=-1)

    def _embed(self, x, signal_valid=None, signal_leads=None):
        x, valid = self._pad(x, signal_valid)
        if valid is not None:  # a patch straddling the end must not see what lies beyond it
            x = x * valid[:, None, :].to(x.dtype)
        if signal_leads is not None:
            leads = signal_leads.to(x.dtype)
            x = x * leads[:, :, None]
        tokens = rearrange(self.patch_embed.proj(x), "b c n -> b n c")
        if signal_leads is not None:
            tokens = tokens + ((1.0 - leads) @ self.lead_missing.to(tokens.dtype))[:, None, :]
        tokens = tokens + sincos_grid(self.width, (tokens.shape[1],))[None].to(tokens.device, tokens.dtype)
        tvalid = None if valid is None else rearrange(valid, "b (n p) -> b n p", p=self.patch_size).any(dim=-1)
        return tokens, tvalid

    def _with_cls(self, tokens, tvalid):
        b = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        if tvalid is not None:
            tvalid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=tokens.device), tvalid], dim=1)
        return tokens, tvalid

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, signal_valid=None, signal_leads=None, **masks) -> torch.Tensor:
        tokens, tvalid = self._with_cls(*self._embed(x, signal_valid, signal_leads))
        tokens = run_blocks(self.blocks, tokens, self.grad_checkpointing, key_padding_mask=tvalid)
        return self.norm(tokens)

    def forward_masked(
        self, x, mask_ratio: float, generator: torch.Generator | None = None, signal_valid=None, signal_leads=None,
        **masks,
    ):
        tokens, tvalid = self._embed(x, signal_valid, signal_leads)
        kept, mask, ids_restore, kept_valid = random_masking(tokens, mask_ratio, generator, valid=tvalid)
        kept, kvalid = self._with_cls(kept, kept_valid if tvalid is not None else None)
        latent = run_blocks(self.blocks, kept, self.grad_checkpointing, key_padding_mask=kvalid)
        return self.norm(latent), mask, ids_restore

    def pool(self, tokens: torch.Tensor, signal_valid=None, **masks) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        valid = None
        if signal_valid is not None:
            n = tokens.shape[1] - 1
            valid = F.pad(signal_valid.to(torch.bool), (0, n * self.patch_size - signal_valid.shape[1]), value=False)
            valid = rearrange(valid, "b (n p) -> b n p", p=self.patch_size).any(dim=-1)
        return masked_mean(tokens[:, 1:], valid)
