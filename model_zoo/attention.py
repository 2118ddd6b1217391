"""Multi-head attention with interchangeable kernels: ``auto | sdpa | flash_attn | xformers | math``.

Every backend implements the same contract, so towers never care which kernel runs:

* ``q`` ``[B, H, Nq, D]``, ``k``/``v`` ``[B, H, Nk, D]`` (head-split layout, as torch SDPA expects).
* ``key_padding_mask`` bool ``[B, Nk]`` with **True = a real key** (same polarity as the loader's ``*_valid``
  masks). Padded keys get no attention weight. Queries are never dropped: a padded query still gets an output
  (attending to the real keys), which the caller ignores; this keeps shapes static for ZeRO-3 and compilers.
* ``causal=True`` masks key j > query i (requires Nq == Nk; top-left aligned, as torch does) — with padded keys
  too, on every backend (flash-attn's own bottom-right alignment is worked around in ``_flash_causal_padded``).
* A query whose keys are *all* padded gets a finite (meaningless) output instead of NaN on sdpa/math/xformers
  and zeros on flash-attn; towers only produce such rows for absent ("dummy") samples, whose outputs are masked
  out of every loss.

``auto`` picks flash-attn, then xformers, only when the package is importable, the tensors are on CUDA and the
dtype is fp16/bf16 (the kernels' supported dtypes); otherwise torch SDPA. The optional packages are imported lazily
so CPU installs never touch them.
"""

from __future__ import annotations

import functools
import importlib
import math as _math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

BACKENDS = ("auto", "sdpa", "flash_attn", "xformers", "math")
_FUSED_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _optional(module: str):
    """Import an optional kernel package once; None when it is missing or broken (e.g. built for another torch)."""
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - an ABI mismatch raises OSError/RuntimeError, not only ImportError
        return None


def available_backends(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Backends that can actually run for tensors on ``device`` with ``dtype`` (math and sdpa always can)."""
    out = ["math", "sdpa"]
    dev = torch.device(device) if device is not None else None
    fused_ok = dev is not None and dev.type == "cuda" and (dtype is None or dtype in _FUSED_DTYPES)
    if fused_ok and _optional("flash_attn") is not None:
        out.append("flash_attn")
    if fused_ok and _optional("xformers.ops") is not None:
        out.append("xformers")
    return out


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend: expected one of {list(BACKENDS)}, got {backend!r}")
    fused_ok = q.is_cuda and q.dtype in _FUSED_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    if backend == "auto":
        if fused_ok and _optional("flash_attn") is not None:
            return "flash_attn"
        if fused_ok and _optional("xformers.ops") is not None:
            return "xformers"
        return "sdpa"
    if backend in ("flash_attn", "xformers"):
        module = "flash_attn" if backend == "flash_attn" else "xformers.ops"
        if _optional(module) is None:
            raise RuntimeError(f"attention backend {backend!r} requested but the package is not importable")
        if not fused_ok:
            raise RuntimeError(
                f"attention backend {backend!r} needs CUDA tensors in fp16/bf16 with head_dim%8==0 and <=256; "
                f"got device={q.device}, dtype={q.dtype}, head_dim={q.shape[-1]}"
            )
    return backend


def _additive_mask(
    key_padding_mask: torch.Tensor | None, causal: bool, nq: int, nk: int, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """Float mask ``[B|1, 1, Nq, Nk]`` with 0 for allowed and the dtype's most negative value for blocked pairs.

    A finite value (not -inf) keeps fully-blocked rows NaN-free: softmax turns them into a uniform average.
    """
    if key_padding_mask is None and not causal:
        return None
    neg = torch.finfo(dtype).min
    allowed = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(nq, nk, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), neg, dtype=dtype, device=device))


def _math_reference(q, k, v, mask, dropout_p, scale):
    """Reference: explicit softmax(QK^T)V, accumulated in float32."""
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask.float()
        scores = scores.clamp_min(torch.finfo(torch.float32).min)  # finfo.min + finfo.min would be -inf
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, vf).to(q.dtype)


def _flash(q, k, v, key_padding_mask, causal, dropout_p, scale):
    fa = _optional("flash_attn")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    qt, kt, vt = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
    if key_padding_mask is None:  # causal here has Nq == Nk, where flash's alignment is the top-left one
        out = fa.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return rearrange(out, "b n h d -> b h n d")
    kpm = key_padding_mask.to(torch.bool)
    if causal:
        return _flash_causal_padded(fa, qt, kt, vt, kpm, dropout_p, scale)
    # Variable-length path: every query stays, only padded keys are removed (cu_seqlens per sample).
    lens_k = kpm.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(lens_k, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * nq, nq, dtype=torch.int32, device=q.device)
    idx = kpm.flatten().nonzero(as_tuple=False).flatten()
    k_un = rearrange(kt, "b n h d -> (b n) h d")[idx]
    v_un = rearrange(vt, "b n h d -> (b n) h d")[idx]
    q_un = rearrange(qt, "b n h d -> (b n) h d")
    out = fa.flash_attn_varlen_func(
        q_un, k_un, v_un, cu_q, cu_k, nq, nk, dropout_p=dropout_p, softmax_scale=scale, causal=False
    )
    return rearrange(out, "(b n) h d -> b h n d", b=b)


def _flash_causal_padded(fa, qt, kt, vt, kpm, dropout_p, scale):
    """Causal self-attention with padded keys on flash-attn, top-left aligned like every other backend.

    flash-attn >= 2.1 aligns the causal mask *bottom-right* when a sample's query and key lengths differ, so the
    plain varlen call (all queries, real keys only) would let query i see keys up to i + (len_k - N). For
    right-padded masks (real keys first, the layout every medfm collate produces) the top-left rule splits into
    two varlen calls with no such mismatch: real queries attend causally to the real keys (equal lengths, where
    both alignments agree), padded queries (i >= len_k) attend to every real key (top-left: j <= i covers them
    all). Any other mask (holes, left padding) has no varlen form: it goes to SDPA with the explicit top-left mask.
    """
    b, n = kpm.shape
    lens = kpm.sum(dim=1, dtype=torch.int32)
    right_padded = bool((kpm == (torch.arange(n, device=kpm.device)[None, :] < lens[:, None])).all())
    if not right_padded:
        q, k, v = (rearrange(t, "b n h d -> b h n d") for t in (qt, kt, vt))
        mask = _additive_mask(kpm, True, n, n, q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    flat = lambda t: rearrange(t, "b n h d -> (b n) h d")  # noqa: E731
    real = kpm.flatten().nonzero(as_tuple=False).flatten()
    pad = (~kpm).flatten().nonzero(as_tuple=False).flatten()
    cu_real = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    cu_pad = F.pad(torch.cumsum(n - lens, 0, dtype=torch.int32), (1, 0))
    k_un, v_un = flat(kt)[real], flat(vt)[real]
    out = torch.zeros_like(flat(qt))
    out[real] = fa.flash_attn_varlen_func(flat(qt)[real], k_un, v_un, cu_real, cu_real, n, n, dropout_p=dropout_p,
                                          softmax_scale=scale, causal=True)
    if pad.numel():
        out[pad] = fa.flash_attn_varlen_func(flat(qt)[pad], k_un, v_un, cu_pad, cu_real, n, n, dropout_p=dropout_p,
                                             softmax_scale=scale, causal=False)
    return rearrange(out, "(b n) h d -> b h n d", b=b)


def _xformers(q, k, v, key_padding_mask, causal, dropout_p, scale):
    xops = _optional("xformers.ops")
    qt, kt, vt = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
    if key_padding_mask is None:
        bias = xops.LowerTriangularMask() if causal else None
    else:
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        mask = _additive_mask(key_padding_mask, causal, nq, nk, q.dtype, q.device)
        # xformers wants the bias' last dim stride-aligned to 8: allocate padded, then view the used part.
        pad_nk = (nk + 7) // 8 * 8
        storage = torch.zeros(b, h, nq, pad_nk, dtype=q.dtype, device=q.device)
        storage[..., :nk] = mask.expand(b, h, nq, nk)
        bias = storage[..., :nk]
    out = xops.memory_efficient_attention(qt, kt, vt, attn_bias=bias, p=dropout_p, scale=scale)
    return rearrange(out, "b n h d -> b h n d")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on ``[B, H, N, D]`` tensors; see the module docstring for the mask contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, H, N, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)}")
    nq, nk = q.shape[2], k.shape[2]
    if causal and nq != nk:
        raise ValueError(f"causal attention needs as many queries as keys, got {nq} queries and {nk} keys")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], nk):
        raise ValueError(
            f"key_padding_mask: expected shape [B={k.shape[0]}, Nk={nk}], got {tuple(key_padding_mask.shape)}"
        )
    scale = scale if scale is not None else 1.0 / _math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q)
    if name == "flash_attn":
        return _flash(q, k, v, key_padding_mask, causal, dropout_p, scale)
    if name == "xformers":
        return _xformers(q, k, v, key_padding_mask, causal, dropout_p, scale)
    if name == "math":
        mask = _additive_mask(key_padding_mask, causal, nq, nk, torch.float32, q.device)
        return _math_reference(q, k, v, mask, dropout_p, scale)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    mask = _additive_mask(key_padding_mask, causal, nq, nk, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class Attention(nn.Module):
    """Multi-head self- or cross-attention with a fused qkv projection (timm/MAE parameter names).

    Self-attention: ``forward(x, key_padding_mask=None, causal=False)``.
    Cross-attention (``kv_dim`` given): ``forward(x, context=ctx, key_padding_mask=ctx_mask)``; queries come
    from ``x`` and keys/values from ``context`` through separate ``q`` and ``kv`` projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        kv_dim: int | None = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend: expected one of {list(BACKENDS)}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.attn_drop = attn_drop
        self.cross = kv_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        h = self.num_heads
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = rearrange(self.q(x), "b n (h d) -> b h n d", h=h)
            k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=h).unbind(0)
        else:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=h).unbind(0)
        out = attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            backend=self.backend,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
