"""Losses: masks, gradients, and the distributed contract (2-rank gloo world == one process on the global batch)."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfm.pretrain.losses import ClipLoss, CoCaLoss, MultiPairLoss, SigLipLoss, caption_loss, mae_loss

B, D, WORLD = 6, 8, 2


def _global_batch():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(WORLD * B, 5, generator=g), torch.randn(WORLD * B, 5, generator=g)
    valid = torch.rand(WORLD * B, generator=g) > 0.3
    valid[:B] = False  # rank 0 holds no valid pair at all: its loss must still be part of the graph
    valid[B] = True
    tokens = torch.randint(0, 11, (WORLD * B, 7), generator=g)
    tok_valid = torch.rand(WORLD * B, 7, generator=g) > 0.2
    patches = torch.randn(WORLD * B, 4, 6, generator=g)
    mask = (torch.rand(WORLD * B, 4, generator=g) > 0.5).float()
    return xa, xb, valid, tokens, tok_valid, patches, mask


def _modules():
    torch.manual_seed(1)
    return (torch.nn.Linear(5, D), torch.nn.Linear(5, D), torch.nn.Parameter(torch.full([1], math.log(10.0))),
            torch.nn.Parameter(torch.full([1], -3.0)), torch.nn.Linear(D, 11), torch.nn.Linear(6, 6))


def _losses(sl, valid_override=None):
    """Every loss on rows ``sl`` of the global batch; returns (dict of losses, list of params)."""
    xa, xb, valid, tokens, tok_valid, patches, mask = _global_batch()
    if valid_override is not None:
        valid = valid_override
    fa, fb, scale, bias, head, dec = _modules()
    a = torch.nn.functional.normalize(fa(xa[sl]), dim=-1)
    b = torch.nn.functional.normalize(fb(xb[sl]), dim=-1)
    v = valid[sl]
    logits = head(a)[:, None, :].expand(-1, 7, -1) + 0.1 * torch.arange(7.0)[None, :, None]
    out = {
        "clip_local": ClipLoss(local_loss=True)(a, b, scale, valid=v),
        "clip_full": ClipLoss(local_loss=False)(a, b, scale, valid=v),
        "clip_full_nograd": ClipLoss(local_loss=False, gather_with_grad=False)(a, b, scale, valid=v),
        "siglip": SigLipLoss()(a, b, scale, bias, valid=v),
        "caption": caption_loss(logits, tokens[sl], tok_valid[sl] & v[:, None]),
        "mae": mae_loss(dec(patches[sl]), patches[sl], mask[sl], norm_pix=True, present=v),
        "coca": CoCaLoss()(a, b, scale, logits, tokens[sl], valid=v, target_valid=tok_valid[sl])["total"],
    }
    out.update(MultiPairLoss([("x", "y")], kind="siglip")({"x": a, "y": b}, {"x": v, "y": v}, scale, bias))
    params = [*fa.parameters(), *fb.parameters(), scale, bias, *head.parameters(), *dec.parameters()]
    return out, params


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _worker(rank, port, out_path):
    errors = []
    try:
        ref, ref_params = _losses(slice(None))  # one process, the whole global batch (before the world exists)
        ref_grads = {name: _grads(loss, ref_params) for name, loss in ref.items()}
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        local, params = _losses(slice(rank * B, (rank + 1) * B))
        for name, loss in local.items():
            val = loss.detach().clone()
            dist.all_reduce(val)
            val /= WORLD
            if not torch.allclose(val, ref[name].detach(), atol=1e-5, rtol=1e-5):
                errors.append(f"{name}: loss {val.item()} != {ref[name].item()}")
            grads = _grads(loss, params)
            for g in grads:  # what DDP / ZeRO do to parameter gradients
                dist.all_reduce(g)
                g /= WORLD
            for i, (g, r) in enumerate(zip(grads, ref_grads[name])):
                if not torch.allclose(g, r, atol=1e-5, rtol=1e-4):
                    errors.append(f"{name}: grad {i} max diff {(g - r).abs().max().item():.3g}")
        dist.destroy_process_group()
    except Exception:
        errors.append(traceback.format_exc())
    with open(f"{out_path}.{rank}", "w") as fh:
        json.dump(errors, fh)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_world_equals_single_process(tmp_path):
    out = str(tmp_path / "res")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            pytest.fail("2-rank loss world hung (timeout)")
    errors = []
    for r in range(WORLD):
        assert os.path.exists(f"{out}.{r}"), f"rank {r} wrote no result"
        errors += json.load(open(f"{out}.{r}"))
    assert not errors, "\n".join(errors)


def test_clip_masks_rows_and_columns():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    scale = torch.zeros(1)
    valid = torch.tensor([True, True, False, True, False])
    masked = ClipLoss()(a, b, scale, valid=valid)
    subset = ClipLoss()(a[valid], b[valid], scale)
    assert torch.allclose(masked, subset)
    # Garbage in an excluded sample changes nothing.
    a2 = a.clone()
    a2[2] = 1e6
    assert torch.allclose(ClipLoss()(a2, b, scale, valid=valid), masked)
    # Nothing valid: a finite zero that still reaches the inputs.
    a3 = a.clone().requires_grad_()
    z = ClipLoss()(a3, b, scale, valid=torch.zeros(5, dtype=torch.bool))
    assert z.item() == 0.0
    z.backward()
    assert a3.grad is not None and torch.isfinite(a3.grad).all()


def test_clip_matches_reference_formula():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    scale = torch.tensor([math.log(1 / 0.07)])
    logits = a @ b.T / 0.07
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
           + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    assert torch.allclose(ClipLoss()(a, b, scale), ref, atol=1e-5)
    with pytest.raises(ValueError, match="gather_with_grad"):
        ClipLoss(local_loss=True, gather_with_grad=False)


def test_siglip_matches_reference_formula():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    z = 2 * torch.eye(4) - 1
    ref = -torch.nn.functional.logsigmoid(z * (10 * a @ b.T - 10)).sum() / 4
    assert torch.allclose(SigLipLoss()(a, b, scale, bias), ref, atol=1e-5)


def test_mae_loss_only_masked_patches_and_norm_pix():
    target = torch.randn(2, 3, 4)
    mask = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    pred = torch.randn(2, 3, 4)
    pred_changed = pred.clone()
    pred_changed[0, 1] += 100  # a kept patch: not in the loss
    assert torch.allclose(mae_loss(pred, target, mask, norm_pix=False), mae_loss(pred_changed, target, mask, False))
    ref = (((pred[0, 0] - target[0, 0]) ** 2).mean() + ((pred[1, 2] - target[1, 2]) ** 2).mean()) / 2
    assert torch.allclose(mae_loss(pred, target, mask, norm_pix=False), ref)
    t = target[0, 0]
    tn = (t - t.mean()) / (t.var(unbiased=False) + 1e-6).sqrt()
    one = torch.tensor([[1.0, 0, 0]])
    assert torch.allclose(mae_loss(pred[:1], target[:1], one, norm_pix=True), ((pred[0, 0] - tn) ** 2).mean())
    # An absent sample contributes nothing.
    present = torch.tensor([True, False])
    assert torch.allclose(mae_loss(pred, target, mask, False, present=present), ((pred[0, 0] - target[0, 0]) ** 2).mean())


def test_caption_loss_ignores_padding():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0]])
    valid = targets != 0
    ref = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    assert torch.allclose(caption_loss(logits, targets, valid), ref)
    assert torch.allclose(caption_loss(logits, targets.masked_fill(~valid, -100)), ref)


def test_multipair_anchored_names_and_masks():
    torch.manual_seed(0)
    emb = {m: torch.nn.functional.normalize(torch.randn(4, 3), dim=-1) for m in ("text", "image", "signal")}
    present = {"text": torch.ones(4, dtype=torch.bool), "image": torch.tensor([1, 1, 0, 1]).bool(),
               "signal": torch.zeros(4, dtype=torch.bool)}
    out = MultiPairLoss.anchored("text", ["image", "text", "signal"])(emb, present, torch.zeros(1))
    assert set(out) == {"text-image", "text-signal"}
    assert out["text-signal"].item() == 0.0
    keep = present["image"]
    assert torch.allclose(out["text-image"], ClipLoss()(emb["text"][keep], emb["image"][keep], torch.zeros(1)))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
