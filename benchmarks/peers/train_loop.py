"""One process of the CLIP training-loop comparison: medfm's own training loop or open_clip's own, on the same tiny
ViT + text CLIP and the same synthetic batch stream. Prints one JSON line.

    python train_loop.py --impl medfm|open_clip [--steps 30] [--warmup 5] [--batch 32] [--compile]

- medfm (in .venv): ``medfm.pretrain.train.run(RunConfig)`` — the loop ``medfm pretrain`` runs (Engine, strategy
  ``ddp`` in a world of one, PretrainModule + ContrastiveObjective + ClipLoss, AdamW with warmup/cosine, grad
  clipping, NaN guard, FLOP counting, metrics). Only the data source is replaced: ``build_data`` returns the
  synthetic stream below instead of shards, so both sides train on identical tensors.
- open_clip (in .venv-peers): ``open_clip_train.train.train_one_epoch`` — open_clip's own loop (its autocast/amp
  plumbing, ``ClipLoss``, scheduler call, grad clipping, logit-scale clamp, meters, logging), with
  ``open_clip.model.CLIP`` of the same widths/depths/heads/patch/context, AdamW and ``cosine_lr`` as in its main.

Timing is taken from the batch stream itself on both sides: the wall time between the request of batch ``warmup``
and batch ``warmup + steps``, i.e. ``steps`` whole loop iterations (fetch, forward, loss, backward, clip, optimizer,
scheduler, the loop's own bookkeeping). Peak RSS is this process's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from types import SimpleNamespace

import torch

IMAGE, PATCH, CONTEXT, VOCAB, EMBED, WIDTH, DEPTH, HEADS = 64, 16, 32, 30522, 32, 64, 2, 4
LR, WD, BETAS, EPS, WARMUP, GRAD_CLIP = 1e-4, 0.05, (0.9, 0.98), 1e-6, 2, 1.0


class Stream:
    """The synthetic batches both loops train on (same seed -> same tensors), with a timestamp per request."""

    def __init__(self, batch: int, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
                      torch.randint(1000, VOCAB, (batch, CONTEXT), generator=g)) for _ in range(n)]
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # this process's CPU time: less sensitive to other jobs on shared cores

    def take(self, i: int):
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        return self.data[i]

    def seconds(self, warmup: int, steps: int, cpu: bool = False) -> float:
        s = self.cpu_stamps if cpu else self.stamps
        return s[warmup + steps] - s[warmup]


# -- medfm --------------------------------------------------------------------------------------------------------
class _MedfmBatches:
    """What ``medfm.pretrain.train.run`` needs from a loader (iteration, state, sources, counters), over Stream."""

    def __init__(self, stream: Stream):
        from medfm.shards.plan import StepPlan

        self.stream, self.i, self.sources = stream, 0, []
        self.plan = StepPlan(-1, ("image", "text"), ("contrastive:image-text",), "all")

    def __iter__(self):
        while self.i < len(self.stream.data):
            images, ids = self.stream.take(self.i)
            self.i += 1
            b = len(images)
            yield {"image": images, "image_present": torch.ones(b, dtype=torch.bool), "text_ids": ids,
                   "text_valid": torch.ones_like(ids, dtype=torch.bool),
                   "text_present": torch.ones(b, dtype=torch.bool), "plan": self.plan}

    def state_dict(self):
        return {"i": self.i}

    def all_counters(self, which="counters", gather_objects=None):
        return {}


def run_medfm(stream: Stream, total_steps: int, batch: int, compile_towers: bool, run_dir: str) -> dict:
    import medfm.pretrain.train as train
    from medfm.model_zoo.multimodal import tiny_config
    from medfm.pretrain.config import RunConfig
    from medfm.schema import from_dict, to_dict

    model = to_dict(tiny_config(("image", "text"), embed_dim=EMBED, image_size=IMAGE, image_chans=3, mae=False,
                                caption=False))
    # Same architecture as open_clip's text transformer, which has no dropout (CLIP trains without it).
    model["towers"]["text"]["overrides"].update(hidden_dropout=0.0, attention_dropout=0.0)
    cfg = from_dict(RunConfig, {
        "name": "peers-bench", "run_dir": run_dir,
        "data": {"sources": [{"path": "synthetic"}], "batch_size": batch, "num_workers": 0},
        "model": model, "objectives": [{"name": "contrastive:image-text"}],
        "optim": {"lr": LR, "weight_decay": WD, "betas": list(BETAS), "eps": EPS, "warmup_steps": WARMUP,
                  "grad_clip": GRAD_CLIP},
        "train": {"steps": total_steps, "strategy": "ddp", "log_every": 100, "peak_tflops": 1.0,
                  "progress": False, **({"compile": True} if compile_towers else {})},
        "checkpoint": {"final": False}, "tracking": {"enabled": False}})
    train.build_data = lambda cfg, engine, rank, world: _MedfmBatches(stream)  # the only substitution
    result = train.run(cfg)
    return {"final_loss": result.losses[-1]["contrastive:image-text"]}


# -- open_clip ----------------------------------------------------------------------------------------------------
def run_open_clip(stream: Stream, total_steps: int, batch: int) -> dict:
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    model = CLIP(embed_dim=EMBED, output_dict=True,
                 vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH,
                                 head_width=WIDTH // HEADS, mlp_ratio=4.0),
                 text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=DEPTH,
                               mlp_ratio=2.0))
    # open_clip_train.main's parameter groups: no decay for gains/biases/logit_scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}],
                            lr=LR, betas=BETAS, eps=EPS)
    scheduler = cosine_lr(opt, LR, WARMUP, total_steps)

    class Loader:
        num_batches, num_samples = total_steps, total_steps * batch

        def __iter__(self):
            for i in range(total_steps):
                yield stream.take(i)

    data = {"train": SimpleNamespace(dataloader=Loader(), set_epoch=lambda epoch: None)}
    args = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                           horovod=False, grad_clip_norm=GRAD_CLIP, rank=0, local_rank=0, world_size=1,
                           log_every_n_steps=100, batch_size=batch, wandb=False, save_logs=False)
    logging.disable(logging.INFO)
    train_one_epoch(model, data, ClipLoss(), 0, opt, None, scheduler, None, args)
    with torch.no_grad():
        out = model(*stream.data[-1])
        return {"final_loss": float(ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=("medfm", "open_clip"), required=True)
    ap.add_argument("--steps", type=int, default=30, help="timed loop iterations")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="medfm only: train.compile=true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps + 1  # the stamp of batch warmup+steps closes the timed window
    stream = Stream(args.batch, total)
    if args.impl == "medfm":
        with tempfile.TemporaryDirectory() as tmp:
            extra = run_medfm(stream, total, args.batch, args.compile, tmp)
    else:
        extra = run_open_clip(stream, total, args.batch)
    dt = stream.seconds(args.warmup, args.steps)
    print(json.dumps({"impl": args.impl + ("+compile" if args.compile else ""), "loop": "own",
                      "samples_s": args.steps * args.batch / dt, "seconds": dt,
                      "samples_cpu_s": args.steps * args.batch / stream.seconds(args.warmup, args.steps, cpu=True),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch": torch.__version__, **extra}))


if __name__ == "__main__":
    main()
