"""One process of the CLIP training-speed comparison: medfm's model + loss, or open_clip's, on the same tiny ViT +
text transformer, the same synthetic batch stream, the same optimizer step. Prints one JSON line.

    python clip_step.py --impl medfm|open_clip [--steps 20] [--warmup 3] [--batch 32]

medfm (in .venv): ``model_zoo.build_multimodal(tiny_config(("image", "text")))`` (2-layer width-64 ViT/16 on 64x64
RGB, 2-layer width-64 BERT text tower), ``model.embed`` on both sides, ``pretrain.losses.ClipLoss``, AdamW.
open_clip (in .venv-peers): ``open_clip.model.CLIP`` with the same widths/depths/heads/patch/context, its forward,
``open_clip.loss.ClipLoss``, AdamW, and the ``logit_scale.clamp_(0, log 100)`` that open_clip_train does after each
step. Peak RSS is this process's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

IMAGE, PATCH, CONTEXT, VOCAB, EMBED = 64, 16, 32, 30522, 32


def batches(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        images = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
        ids = torch.randint(1000, VOCAB, (batch, CONTEXT), generator=g)
        yield images, ids


def medfm_step_fn():
    from medfm.model_zoo.multimodal import build_multimodal, tiny_config
    from medfm.pretrain.losses import ClipLoss

    model = build_multimodal(tiny_config(("image", "text"), embed_dim=EMBED, image_size=IMAGE, image_chans=3,
                                         mae=False, caption=False))
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, ids):
        b = {"image": images, "image_present": torch.ones(len(images), dtype=torch.bool),
             "text_ids": ids, "text_valid": torch.ones_like(ids, dtype=torch.bool),
             "text_present": torch.ones(len(ids), dtype=torch.bool)}
        loss = loss_fn(model.embed("image", b), model.embed("text", b), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return model, step


def open_clip_step_fn():
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP

    model = CLIP(embed_dim=EMBED, output_dict=True,
                 vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=64, layers=2, head_width=16, mlp_ratio=4.0),
                 text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=64, heads=4, layers=2, mlp_ratio=2.0))
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, ids):
        out = model(images, ids)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    return model, step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=("medfm", "open_clip"), required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, step = (medfm_step_fn if args.impl == "medfm" else open_clip_step_fn)()
    model.train()
    stream = batches(args.batch)
    for _ in range(args.warmup):
        step(*next(stream))
    data = [next(stream) for _ in range(args.steps)]  # generated outside the timed region
    t0 = time.perf_counter()
    for images, ids in data:
        loss = step(images, ids)
    dt = time.perf_counter() - t0
    print(json.dumps({"impl": args.impl, "samples_s": args.steps * args.batch / dt, "seconds": dt,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "params": sum(p.numel() for p in model.parameters()), "final_loss": float(loss),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
