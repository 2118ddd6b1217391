"""Is the demo's MAE loss plateau (norm-pix ~0.98 after 150 demo steps) the step budget or a defect?

MAE alone on the demo corpus's mri2d training images, the demo's image tower and MAE decoder, one process, CPU:
prints the masked norm-pix loss (running mean of 25 steps) and the loss of the mean prediction (pred = 0, what the
plateau is) on a fixed held-out batch with a fixed mask, every ``--every`` steps; writes the reconstruction PNG.

    python benchmarks/mae_plateau.py runs/demo/corpus/shards/mri2d --steps 1000 --out /tmp/mae_plateau

Not a speed benchmark: nothing here is timed beyond wall-clock progress.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--decoder", default="32,1,2", help="decoder width,depth,heads (demo: 32,1,2)")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", default="/tmp/mae_plateau")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from medfm.evals.data import index_split, read_samples
    from medfm.model_zoo import build_multimodal
    from medfm.pretrain.losses import mae_loss
    from medfm.pretrain.mae_figure import plot_reconstructions, reconstruct
    from medfm.shards.collate import CollateConfig, collate
    from medfm.shards.plan import StepPlan

    index = index_split(a.shards, "train")
    samples = read_samples(index, range(len(index)))
    data = collate(samples, StepPlan(0, ("image",), (), "mae"), CollateConfig(image_size=[32, 32], image_channels=1))
    images = data["image"]
    held = images[-32:]  # fixed held-out batch (not trained on)
    train = images[:-32]
    w, d, h = (int(v) for v in a.decoder.split(","))
    model = build_multimodal({
        "embed_dim": 64, "mae": ["image"], "mae_decoder": {"width": w, "depth": d, "num_heads": h},
        "caption": {"enabled": False},
        "towers": {"image": {"arch": "vit2d_tiny_p16", "overrides": {"img_size": 32, "patch_size": 4, "in_chans": 1,
                                                                     "width": 64, "depth": 3, "num_heads": 4}}}})
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05, betas=(0.9, 0.95))
    warm = 10

    def lr_at(step):
        if step < warm:
            return a.lr * (step + 1) / warm
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, a.steps - warm))))

    def held_loss():
        model.eval()
        with torch.no_grad():
            out = model.mae("image", {"image": held}, a.mask_ratio, torch.Generator().manual_seed(123))
            loss = float(mae_loss(out["pred"], out["target"], out["mask"]))
            zero = float(mae_loss(torch.zeros_like(out["pred"]), out["target"], out["mask"]))
        model.train()
        return loss, zero

    g = torch.Generator().manual_seed(0)
    recent, log, t0 = [], [], time.perf_counter()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(train), (a.batch,), generator=g)
        out = model.mae("image", {"image": train[idx]}, a.mask_ratio)
        loss = mae_loss(out["pred"], out["target"], out["mask"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [float(loss)])[-25:]
        if (step + 1) % a.every == 0 or step + 1 in (50, 150):
            hl, zero = held_loss()
            row = {"step": step + 1, "train_loss_avg25": round(sum(recent) / len(recent), 4),
                   "heldout_loss": round(hl, 4), "heldout_mean_prediction": round(zero, 4),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    plot_reconstructions(reconstruct(model, {"image": held[:6]}, "image", a.mask_ratio),
                         out_dir / "mae_image.png", f"MAE alone on mri2d, {a.steps} steps")
    (out_dir / "log.json").write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
