"""Transformer building blocks shared by every tower and decoder (pre-norm blocks, MLP, drop-path, layer-scale)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfm.model_zoo.attention import Attention


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample (scaled so the expectation is unchanged)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT/DINOv2); a vector, never a 0-dim parameter."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)) [+ cross-attn(norm(x), context)] + mlp(norm(x)).

    Parameter names follow timm's VisionTransformer (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1/fc2, ls2) so
    2D ViT weights map to timm one-to-one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        backend: str = "auto",
        cross_dim: int | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        if cross_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend, kv_dim=cross_dim)
            self.ls_cross = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), key_padding_mask=key_padding_mask, causal=causal)))
        if self.cross_attn is not None:
            y = self.cross_attn(self.norm_cross(x), context=context, key_padding_mask=context_mask)
            x = x + self.drop_path(self.ls_cross(y))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def check_encoder_config(cfg) -> None:
    """The checks every transformer tower config shares (ValueError naming the field)."""
    from medfm.model_zoo.attention import BACKENDS

    if cfg.width % cfg.num_heads:
        raise ValueError(f"width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
    if cfg.attn_backend not in BACKENDS:
        raise ValueError(f"attn_backend: expected one of {list(BACKENDS)}, got {cfg.attn_backend!r}")


def encoder_blocks(cfg) -> nn.ModuleList:
    """``cfg.depth`` pre-norm blocks with stochastic depth rising linearly to ``cfg.drop_path`` (as in timm/MAE)."""
    dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    return nn.ModuleList(
        Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.layer_scale, cfg.attn_backend)
        for i in range(cfg.depth)
    )


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    grad_checkpointing: bool,
    key_padding_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Apply blocks in order, recomputing each block's activations in backward when checkpointing is on."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, key_padding_mask, use_reentrant=False, **kwargs)
        else:
            x = blk(x, key_padding_mask, **kwargs)
    return x


def zero_init_active() -> bool:
    """True while a ``deepspeed.zero.Init`` context is open (parameters get partitioned as modules are built)."""
    zp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return bool(zp is not None and getattr(zp, "zero_init_context", 0))


@contextmanager
def whole_params(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Make ``params`` whole for an in-place init, also when built under ``deepspeed.zero.Init``.

    Under zero.Init a sub-module's parameters are partitioned (local shape [0], ``ds_id`` set) as soon as its own
    ``__init__`` returns, so a tower's init pass over its sub-modules would see empty tensors. Such parameters are
    gathered here, initialised, and rank 0's values re-partitioned to every rank (``modifier_rank=0``). Outside
    zero.Init this is a no-op and DeepSpeed is never imported. A collective when any parameter is partitioned:
    every rank must run the same init calls in the same order (they do: model construction is deterministic).
    """
    zero = [p for p in params if hasattr(p, "ds_id")]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=0):
        yield


def init_weights_mae(module: nn.Module) -> None:
    """MAE/timm init: xavier-uniform linears (trunc-normal for embeddings), zero biases, unit LayerNorms.

    One leaf module at a time (each gathered on its own under zero.Init), so a ZeRO-3 build never materialises
    more than one layer's weights."""
    for m in module.modules():
        if not isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)):
            continue
        with whole_params(m.parameters(recurse=False)):
            _init_leaf(m)


def _init_leaf(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)


def init_patch_proj(conv: nn.Module) -> None:
    """MAE initialises the patch projection like a linear layer on the flattened patch."""
    with whole_params(conv.parameters(recurse=False)):
        w = conv.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
