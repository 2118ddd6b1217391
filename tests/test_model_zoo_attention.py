"""Every attention backend available here equals the math reference, forward and backward, with and without masks.

"Here" is the current device: on a CUDA host the fused kernels (flash-attn, xformers, in bf16) are collected too.
On CPU the flash-attn path's own logic (varlen calls, the causal+padding work-around) runs against a fake
flash_attn module that reproduces flash-attn >= 2.1's semantics, bottom-right causal alignment included.
"""

import importlib

import pytest
import torch

from medfm.model_zoo.attention import Attention, attention, available_backends, resolve_backend

attention_mod = importlib.import_module("medfm.model_zoo.attention")  # the package re-exports the function
B, H, N, D = 2, 3, 7, 8
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # the fused kernels' dtype on CUDA
TOL = 2e-2 if DTYPE == torch.bfloat16 else 1e-5


def _qkv(nq=N, nk=N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, nk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, nk, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def _padding(nk=N):
    mask = torch.ones(B, nk, dtype=torch.bool)
    mask[1, nk - 3 :] = False  # second sample has 3 padded keys
    return mask


CASES = [
    pytest.param(None, False, N, id="plain"),
    pytest.param("pad", False, N, id="padding"),
    pytest.param(None, True, N, id="causal"),
    pytest.param("pad", True, N, id="padding+causal"),
    pytest.param("pad", False, 11, id="cross-padding"),
]


def _assert_matches_math(fn, pad, causal, nk, device=DEVICE, dtype=DTYPE, tol=TOL):
    """``fn(q, k, v, kpm, causal)`` on ``device``/``dtype`` equals fp32 math on the CPU, forward and backward."""
    kpm = _padding(nk) if isinstance(pad, str) else pad
    q, k, v = _qkv(nk=nk)
    ref = attention(q, k, v, key_padding_mask=kpm, causal=causal, backend="math")
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().to(device, dtype).requires_grad_(True) for t in (q, k, v))
    out = fn(q2, k2, v2, None if kpm is None else kpm.to(device), causal)
    grads = torch.autograd.grad(out.float().square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g.float().cpu(), gr, atol=tol * float(gr.abs().max()), rtol=tol)


@pytest.mark.parametrize("backend", [b for b in available_backends(DEVICE, DTYPE) if b != "math"])
@pytest.mark.parametrize("pad,causal,nk", CASES)
def test_backend_matches_math_forward_backward(backend, pad, causal, nk):
    _assert_matches_math(lambda q, k, v, kpm, c: attention(q, k, v, key_padding_mask=kpm, causal=c, backend=backend),
                         pad, causal, nk)


class FakeFlashAttn:
    """flash_attn's two entry points in plain torch, with flash-attn >= 2.1's semantics: causal is aligned to the
    bottom-right corner when a sequence's query and key lengths differ, and a query with no key gets zeros."""

    @staticmethod
    def _one(q, k, v, scale, causal):  # [Lq, H, D], [Lk, H, D]
        lq, lk = q.shape[0], k.shape[0]
        if lk == 0:
            return torch.zeros_like(q)
        s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.nan_to_num(s.softmax(dim=-1), nan=0.0)
        return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        return torch.stack([self._one(q[i], k[i], v[i], softmax_scale, causal) for i in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False):
        parts = [self._one(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]], softmax_scale,
                           causal) for i in range(len(cu_q) - 1)]
        return torch.cat(parts) if parts else q[:0]


def _holes(nk=N):
    mask = torch.ones(B, nk, dtype=torch.bool)
    mask[0, 2] = False  # holes: no varlen form under causal (key 0 stays real: no query is left without keys)
    mask[1, 3:5] = False
    return mask


@pytest.mark.parametrize("pad,causal,nk", [*CASES, pytest.param(_holes(), True, N, id="holes+causal"),
                                           pytest.param(_holes(), False, N, id="holes")])
def test_flash_path_logic_matches_math(monkeypatch, pad, causal, nk):
    fake = FakeFlashAttn()
    monkeypatch.setattr(attention_mod, "_optional", lambda m: fake if m == "flash_attn" else None)
    scale = 1.0 / D**0.5
    _assert_matches_math(lambda q, k, v, kpm, c: attention_mod._flash(q, k, v, kpm, c, 0.0, scale), pad, causal, nk,
                         device=torch.device("cpu"), dtype=torch.float32, tol=1e-5)


def test_padded_keys_get_no_weight():
    q, k, v = _qkv()
    kpm = _padding()
    out = attention(q, k, v, key_padding_mask=kpm, backend="math")
    # changing padded keys/values must not change any output
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, -3:] = 1e3
    v2[1, :, -3:] = -1e3
    out2 = attention(q.detach(), k2, v2, key_padding_mask=kpm, backend="sdpa")
    torch.testing.assert_close(out.detach(), out2, atol=1e-5, rtol=1e-5)


def test_causal_ignores_future():
    q, k, v = _qkv()
    out = attention(q, k, v, causal=True, backend="sdpa").detach()
    v2 = v.detach().clone()
    v2[:, :, -1] += 100.0  # only the last query may see the last key
    out2 = attention(q.detach(), k.detach(), v2, causal=True, backend="sdpa")
    torch.testing.assert_close(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.allclose(out[:, :, -1], out2[:, :, -1])


def test_fully_padded_row_is_finite():
    q, k, v = _qkv()
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0] = False  # an absent ("dummy") sample
    for backend in ("math", "sdpa"):
        out = attention(q, k, v, key_padding_mask=kpm, backend=backend)
        assert torch.isfinite(out).all(), backend
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        q.grad = k.grad = v.grad = None


def test_bf16_sdpa_close_to_math():
    q, k, v = _qkv(dtype=torch.bfloat16)
    kpm = _padding()
    out = attention(q, k, v, key_padding_mask=kpm, backend="sdpa")
    ref = attention(q.float(), k.float(), v.float(), key_padding_mask=kpm, backend="math")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_auto_picks_sdpa_on_cpu_and_fused_requests_fail_clearly():
    q, _, _ = _qkv()
    assert resolve_backend("auto", q) == "sdpa"
    for name in ("flash_attn", "xformers"):
        with pytest.raises(RuntimeError, match=name):
            resolve_backend(name, q)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("fancy", q)


def test_bad_mask_and_causal_shapes_raise():
    q, k, v = _qkv(nk=9)
    with pytest.raises(ValueError, match="causal"):
        attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(B, 4, dtype=torch.bool))


def test_attention_module_self_and_cross_backends_agree():
    torch.manual_seed(0)
    x = torch.randn(B, 5, 24)
    ctx = torch.randn(B, 9, 16)
    ctx_mask = torch.ones(B, 9, dtype=torch.bool)
    ctx_mask[0, 6:] = False
    self_attn = Attention(24, 4, backend="math")
    cross = Attention(24, 4, backend="math", kv_dim=16)
    ref_self = self_attn(x, causal=True)
    ref_cross = cross(x, context=ctx, key_padding_mask=ctx_mask)
    self_attn.backend = cross.backend = "sdpa"
    torch.testing.assert_close(self_attn(x, causal=True), ref_self, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross(x, context=ctx, key_padding_mask=ctx_mask), ref_cross, atol=1e-5, rtol=1e-5)
