"""Training-step benchmark (not a test; numbers go to docs/notes/pretrain.md and benchmarks/RESULTS.md).

1. One process, same model and batch: the medfm step (Engine + the loop's per-micro-step work: NaN all-reduce,
   loss dict, weighted total, clip, AdamW, schedule) / a minimal hand-written torch loop.   target <= 1.05
2. Two processes (torchrun, gloo): ZeRO-3 step / DDP step (target <= 1.3) and per-rank parameter bytes / full
   (target <= 0.55, persistence threshold 0), for each ZeRO knob preset in ``ZERO_PRESETS`` and two model sizes:
   ``small`` (ViT 192x4 on 16px images, ~2M params: gathers dominate) and ``vits`` (ViT-S/16 on 112px images,
   ~22M params + decoder: compute matters).
3. CPU MFU of a small ViT MAE step (FLOPs counted by torch.utils.flop_counter, peak = measured dense matmul).

    python benchmarks/train_step.py [overhead] [zero3] [zero3-vits] [mfu]   # default all but zero3-vits; JSON
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))

import torch  # noqa: E402

from medfm.pretrain.config import RunConfig  # noqa: E402
from medfm.schema import from_dict  # noqa: E402

STEPS, WARMUP = 12, 3


def _ensure_shards(tmp: Path) -> Path:
    """Written once by the parent process (torchrun ranks only read them)."""
    from pretrain_support import make_shards

    shards = tmp / "shards"
    if not (shards / "manifest.json").is_file():
        make_shards(shards, n=32, modalities=("image", "text"))
    return shards


SIZES = {
    "small": {"image": {"width": 192, "depth": 4, "num_heads": 3}, "px": 16, "decoder": [128, 2, 4]},
    "vits": {"image": {"width": 384, "depth": 12, "num_heads": 6, "patch_size": 16}, "px": 112,
             "decoder": [256, 2, 8]},
}
# ZeRO knobs tried against DDP. "threshold0" is what the tests run (every parameter partitioned).
ZERO_PRESETS = {
    "threshold0": {"stage3_param_persistence_threshold": 0},
    "default": {},  # DeepSpeed's defaults: persistence threshold 1e5, prefetch 5e7, no overlap
    "overlap": {"overlap_comm": True},
    "big_buckets": {"stage3_prefetch_bucket_size": 500_000_000, "reduce_bucket_size": 500_000_000,
                    "stage3_max_live_parameters": 2_000_000_000, "stage3_max_reuse_distance": 2_000_000_000},
    "no_contiguous": {"contiguous_gradients": False},
    "persist_1e6": {"stage3_param_persistence_threshold": 1_000_000},
}


def _config(tmp: Path, strategy: str, size: str = "small", batch: int = 8, zero: dict | None = None) -> RunConfig:
    from pretrain_support import run_config

    shards = tmp / "shards"
    spec = SIZES[size]
    cfg = run_config(tmp / f"run_{strategy}", str(shards), [{"name": "mae:image"}, {"name": "contrastive:image-text"}],
                     ("image", "text"), batch=batch, steps=STEPS + WARMUP, train={"strategy": strategy})
    img = cfg["model"]["towers"]["image"]["overrides"]
    img.update({**spec["image"], "img_size": spec["px"]})
    cfg["data"]["collate"]["image_size"] = [spec["px"], spec["px"]]
    w, d, h = spec["decoder"]
    cfg["model"]["mae_decoder"] = {"width": w, "depth": d, "num_heads": h}
    cfg["zero"] = {"zero_init": True, **(zero or {})}
    return from_dict(RunConfig, cfg)


def _batch(cfg: RunConfig, engine):
    from medfm.pretrain.train import build_data

    loader = build_data(cfg, engine, engine.rank, engine.world_size)
    return next(iter(loader))


def _time(fn, steps=STEPS, warmup=WARMUP) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def medfm_vs_handwritten(tmp: Path) -> dict:
    from medfm.pretrain.engine import Engine, init_distributed
    from medfm.pretrain.losses import ClipLoss, mae_loss
    from medfm.pretrain.train import _micro_step

    init_distributed()
    _ensure_shards(tmp)
    cfg = _config(tmp, "ddp")
    engine = Engine(cfg, 0, 1)
    batch = _batch(cfg, engine)
    plan = batch["plan"]

    def medfm_step():
        _micro_step(engine, batch, plan, False)
        engine.step(False)

    # The hand-written loop: the same modules, losses and optimizer, nothing else.
    model = engine.module.model
    opt, sched = engine.optimizer, engine.scheduler
    clip = ClipLoss()
    params = list(engine.module.parameters())

    def hand_step():
        out = model.mae("image", batch, mask_ratio=0.75)
        loss = mae_loss(out["pred"], out["target"], out["mask"])
        loss = loss + clip(model.embed("image", batch), model.embed("text", batch), model.logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    # Alternate step by step so both see the same machine load (shared CPUs are noisy); medians of the pairs.
    for _ in range(WARMUP):
        medfm_step()
        hand_step()
    medfm_t, hand_t = [], []
    for _ in range(STEPS):
        medfm_t.append(_time(medfm_step, steps=1, warmup=0))
        hand_t.append(_time(hand_step, steps=1, warmup=0))
    m, h = statistics.median(medfm_t), statistics.median(hand_t)
    return {"medfm_step_s": m, "handwritten_step_s": h, "ratio": m / h}


def mae_mfu(tmp: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from medfm.model_zoo import build_multimodal
    from medfm.pretrain.losses import mae_loss
    from medfm.pretrain.peak_flops import measure_peak_flops

    cfg = {"towers": {"image": {"arch": "vit2d_small_p16", "overrides": {"img_size": 224}}}, "mae": ["image"],
           "mae_decoder": {"width": 256, "depth": 2, "num_heads": 8}}
    model = build_multimodal(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {"image": torch.randn(8, 3, 224, 224)}

    def step():
        out = model.mae("image", batch, mask_ratio=0.75)
        mae_loss(out["pred"], out["target"], out["mask"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    t = _time(step, steps=4, warmup=1)
    peak = measure_peak_flops(torch.float32)
    return {"arch": "vit2d_small_p16 MAE (224px, ratio 0.75, batch 8, decoder 256x2)", "step_s": t,
            "flops_per_step": flops, "achieved_tflops": flops / t / 1e12, "peak_tflops_measured": peak / 1e12,
            "mfu": flops / t / peak, "threads": torch.get_num_threads()}


def _worker(out: str, size: str, presets: list[str]) -> None:
    """torchrun: DDP and each ZeRO-3 preset's step time and parameter bytes on this rank.

    All engines are built first, then stepped round-robin (one step of each in turn) so every configuration sees
    the same machine load over time — the shared CPUs' load drifts too much for back-to-back blocks to compare."""
    import torch.distributed as dist

    from medfm.pretrain.engine import Engine, init_distributed, setup_environment
    from medfm.pretrain.train import _micro_step

    setup_environment()
    rank, world = init_distributed()
    tmp = Path(out).parent
    steps, warmup = (STEPS, WARMUP) if size == "small" else (6, 2)
    names = ["ddp", *presets]
    steppers, res = {}, {}
    for name in names:
        strategy = "ddp" if name == "ddp" else "zero3"
        cfg = _config(tmp, strategy, size, zero=ZERO_PRESETS.get(name))
        engine = Engine(cfg, rank, world)
        batch = _batch(cfg, engine)

        def step(engine=engine, batch=batch):
            _micro_step(engine, batch, batch["plan"], False)
            engine.step(False)

        steppers[name] = step
        res[name] = {"local_param_bytes": engine.local_param_bytes(), "full_param_bytes": engine.full_param_bytes()}
    times = {name: [] for name in names}
    for i in range(warmup + steps):
        for name in names:
            dist.barrier()
            t = time.perf_counter()
            steppers[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    for name in names:
        res[name]["step_s"] = statistics.median(times[name])
        if rank == 0:
            print(f"{size} {name}: {res[name]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(res))


def zero3_vs_ddp(tmp: Path, size: str = "small", presets: list[str] | None = None) -> dict:
    """Step-time ratios ZeRO-3 / DDP per preset (the medians of interleaved steps; max over ranks)."""
    _ensure_shards(tmp)
    presets = presets or list(ZERO_PRESETS)
    out = tmp / f"dist_{size}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(HERE), "--worker", str(out), size, ",".join(presets)], check=True, env=env, timeout=3600)
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    d = max(r["ddp"]["step_s"] for r in ranks)
    full = ranks[0]["ddp"]["full_param_bytes"]
    summary = {"size": size, "params": full // 4, "ddp_step_s": d}
    for name in presets:
        z = max(r[name]["step_s"] for r in ranks)
        frac = max(r[name]["local_param_bytes"] / r[name]["full_param_bytes"] for r in ranks)
        summary[name] = {"zero3_step_s": z, "ratio": z / d, "per_rank_param_bytes_fraction": frac}
    return summary


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4].split(","))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        parts = sys.argv[1:] or ["overhead", "zero3", "mfu"]
        summary = {}
        if "overhead" in parts:
            summary["medfm_vs_handwritten"] = medfm_vs_handwritten(tmp)
        if "zero3" in parts:
            summary["zero3_vs_ddp_2proc"] = zero3_vs_ddp(tmp)
        if "zero3-vits" in parts:
            summary["zero3_vs_ddp_2proc_vits"] = zero3_vs_ddp(tmp, "vits")
        if "mfu" in parts:
            summary["mae_mfu_cpu"] = mae_mfu(tmp)
    summary["host"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
