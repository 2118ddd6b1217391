"""Regression: 1-D (ECG) MAE must learn from neighbouring patches within a few dozen steps.

Before the 1-D decoder got its neighbour mixing (model_zoo/mae.py ``MAEDecoder1D.local_mix``), a signal MAE sat on
the "predict the patch mean" saddle: normalised loss ~1.0 for hundreds of steps, signal tower gradient ~0.01 (the
demo's ``loss/mae:signal`` stuck at 0.9986). A random-phase sinusoid is trivially predictable from the patches on
either side of a masked one, so the loss must fall well below 1.
"""

from __future__ import annotations

import math

import torch

from medfm.model_zoo.multimodal import build_multimodal
from medfm.pretrain.losses import mae_loss

N_LEADS, LENGTH, PATCH, FS = 1, 500, 25, 250.0


def _sines(gen: torch.Generator, batch: int = 16) -> dict:
    t = torch.arange(LENGTH) / FS
    freq = 1.0 + 2.0 * torch.rand(batch, 1, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(batch, 1, 1, generator=gen)
    signal = 0.4 * torch.sin(2 * math.pi * freq * t + phase)
    return {"signal": signal.float(), "signal_valid": torch.ones(batch, LENGTH, dtype=torch.bool),
            "signal_leads": torch.ones(batch, N_LEADS, dtype=torch.bool)}


def _model():
    torch.manual_seed(0)
    return build_multimodal({
        "embed_dim": 16,
        "towers": {"signal": {"arch": "signal_tiny", "overrides": {
            "n_leads": N_LEADS, "patch_size": PATCH, "max_len": LENGTH, "width": 32, "depth": 2, "num_heads": 2}}},
        "mae": ["signal"],
        "mae_decoder": {"width": 32, "depth": 1, "num_heads": 2},
    })


def test_signal_mae_learns_from_neighbours():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    data_gen, mask_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    losses, tower_grad = [], []
    for _ in range(60):
        out = model.mae("signal", _sines(data_gen), mask_ratio=0.5, generator=mask_gen)
        loss = mae_loss(out["pred"], out["target"], out["mask"] * out["valid"], norm_pix=True)
        opt.zero_grad()
        loss.backward()
        tower_grad.append(torch.stack([p.grad.norm() for p in model.towers["signal"].parameters()]).norm().item())
        opt.step()
        losses.append(loss.item())
    late = sum(losses[-10:]) / 10
    print(f"last-10 loss {late:.3f}, tower grad {sum(tower_grad[-10:]) / 10:.3f}")
    assert late < 0.7, f"signal MAE stuck near the patch-mean saddle: last-10 mean loss {late:.3f}"
    assert sum(tower_grad[-10:]) / 10 > 0.03, f"signal tower gets no gradient: {tower_grad[-10:]}"


def test_local_mix_ignores_padded_patches():
    """Neighbour mixing must not pull padded (invalid) patches into real ones."""
    model = _model().eval()
    batch = _sines(torch.Generator().manual_seed(3), batch=2)
    short = dict(batch)
    short["signal_valid"] = batch["signal_valid"].clone()
    short["signal_valid"][:, 300:] = False
    garbage = dict(short)
    garbage["signal"] = batch["signal"].clone()
    garbage["signal"][..., 300:] = 1e3
    with torch.no_grad():
        a = model.mae("signal", short, 0.5, torch.Generator().manual_seed(4))
        b = model.mae("signal", garbage, 0.5, torch.Generator().manual_seed(4))
    real = a["valid"]
    assert torch.allclose(a["pred"][real], b["pred"][real], atol=1e-5)
