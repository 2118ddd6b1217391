"""Every attention backend available here equals the math reference, forward and backward, with and without masks."""

import pytest
import torch

from medfm.model_zoo.attention import Attention, attention, available_backends, resolve_backend

B, H, N, D = 2, 3, 7, 8


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


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "math"])
@pytest.mark.parametrize("pad,causal,nk", CASES)
def test_backend_matches_math_forward_backward(backend, pad, causal, nk):
    kpm = _padding(nk) if pad else None
    q, k, v = _qkv(nk=nk)
    ref = attention(q, k, v, key_padding_mask=kpm, causal=causal, backend="math")
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q2, k2, v2, key_padding_mask=kpm, causal=causal, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


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
