"""EHR event-sequence transformer (MEDS-style events: time, code, numeric value).

Each event token = code embedding + embedding of its time + (if it has a value) a value embedding. Times are days
relative to the index (or first) event and are encoded with continuous sin-cos features over periods from ~1 hour
to ~100 years, so irregular sampling needs no bucketing. Values pass through sign(v)*log1p(|v|) so lab values of
any scale stay in a sane range. Codes follow the shard vocabulary: id 0 ``<pad>``, id 1 ``<unk>``; ids outside the
vocabulary map to ``<unk>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medfm.model_zoo.layers import (
    check_encoder_config,
    encoder_blocks,
    init_weights_mae,
    run_blocks,
    whole_params,
)
from medfm.model_zoo.tower import Tower, masked_mean

UNK_ID = 1


@dataclass
class EHRConfig:
    vocab_size: int = 4096  # size of manifest["vocabularies"]["ehr"]
    width: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    time_features: int = 64  # sin-cos time features before the projection (even)
    pool: Literal["cls", "mean"] = "cls"
    drop_path: float = 0.0
    layer_scale: float | None = None
    attn_backend: str = "auto"
    grad_checkpointing: bool = False

    def validate(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (<pad>, <unk>), got {self.vocab_size}")
        if self.time_features % 2:
            raise ValueError(f"time_features must be even, got {self.time_features}")
        check_encoder_config(self)


def time_freqs(n_features: int, device=None) -> torch.Tensor:
    """Angular frequencies (rad/day) of the sin-cos time features: periods from 1 hour to 100 years, geometric.

    Computed in fp32 at each call, not held as a buffer: a module cast to bf16 (DeepSpeed's bf16 mode) would round
    a buffer to 8 mantissa bits, and at -1000 days the 1-hour feature's angle (~1.5e5 rad) would then be off by
    hundreds of radians — training and (fp32) evaluation would see different features."""
    periods = torch.logspace(math.log10(1.0 / 24.0), math.log10(36525.0), n_features // 2, dtype=torch.float64)
    return (2 * math.pi / periods).to(device=device, dtype=torch.float32)


class EHRTransformer(Tower):
    modality = "ehr"
    batch_keys = ("ehr_codes", "ehr_times", "ehr_values", "ehr_has_value", "ehr_valid")
    num_prefix_tokens = 1

    def __init__(self, cfg: EHRConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.width = cfg.width
        self.code_embed = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=0)
        self.time_proj = nn.Linear(cfg.time_features, cfg.width)
        self.value_proj = nn.Linear(1, cfg.width)
        self.has_value_embed = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.grad_checkpointing = cfg.grad_checkpointing
        init_weights_mae(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.has_value_embed, std=0.02)
        with torch.no_grad(), whole_params([self.code_embed.weight]):
            self.code_embed.weight[0].zero_()

    def embed_events(self, codes, times=None, values=None, has_value=None) -> torch.Tensor:
        if codes.dim() != 2:
            raise ValueError(f"ehr_codes: expected [B, N], got {tuple(codes.shape)}")
        codes = torch.where((codes >= self.cfg.vocab_size) | (codes < 0), torch.full_like(codes, UNK_ID), codes)
        x = self.code_embed(codes)
        if times is not None:
            ang = times.float()[..., None] * time_freqs(self.cfg.time_features, times.device)
            x = x + self.time_proj(torch.cat([ang.sin(), ang.cos()], dim=-1).to(x.dtype))
        if values is not None:
            hv = (has_value if has_value is not None else torch.ones_like(values)).to(x.dtype)[..., None]
            v = values.float()
            v = (torch.sign(v) * torch.log1p(v.abs())).to(x.dtype)[..., None]
            x = x + hv * (self.value_proj(v) + self.has_value_embed.to(x.dtype))
        return x

    def forward(self, ehr_codes, ehr_times=None, ehr_values=None, ehr_has_value=None, ehr_valid=None, **masks):
        x = self.embed_events(ehr_codes, ehr_times, ehr_values, ehr_has_value)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        kpm = None
        if ehr_valid is not None:
            kpm = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), ehr_valid.to(torch.bool)], dim=1)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing, key_padding_mask=kpm))

    def token_valid(self, x, ehr_valid=None, **masks):
        return None if ehr_valid is None else ehr_valid.to(torch.bool)

    def pool(self, tokens: torch.Tensor, ehr_valid=None, **masks) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        return masked_mean(tokens[:, 1:], None if ehr_valid is None else ehr_valid.to(torch.bool))
