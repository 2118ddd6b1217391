"""ViT-L/16 + MiniLM (configs/image_large.yaml, zero_init on, MiniLM weights loaded under deepspeed.zero.Init) for a
few steps on 2 CPU ranks, ZeRO-3 with and without optimizer offload: measured peak RSS per rank against the dry-run's
ZeRO-3 model-state estimate (launch/memory.py; on CPU device and host memory are the same, so the estimate per rank
is device + host / ranks), step time and MFU from the run's metrics.jsonl.

    python benchmarks/zero3_large.py --shards DIR [--steps 3] [--batch 2] [--out benchmarks/zero3_large.json]

The estimate counts model states only (no activations, no framework baseline), so the ratio says how far that is
from what a run really holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _worker(config_path: str, out: str) -> None:
    from medfm.pretrain.config import load_run_config
    from medfm.pretrain.train import run

    res = run(load_run_config(config_path, []))
    import torch.distributed as dist

    rank = dist.get_rank()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps({"status": res.status, "peak_rss": peak}))


def _estimate(cfg, nproc: int) -> dict:
    from medfm.launch.memory import count_model, zero3_model_states

    size = count_model(cfg)
    est = zero3_model_states(size.total_params, size.largest_layer_params, nproc, 1, cfg.zero.offload_optimizer,
                             cfg.zero.offload_params, cfg.zero.zero_init)
    return {"params": size.total_params, "device": est.device_bytes, "host": est.host_bytes,
            "per_rank": est.device_bytes + est.host_bytes / nproc}


def bench(shards: str, steps: int, batch: int, offload: bool, tmp: Path) -> dict:
    from medfm.pretrain.config import load_run_config

    cfg = yaml.safe_load((ROOT / "configs" / "image_large.yaml").read_text())
    run_dir = tmp / f"offload_{offload}"
    cfg["data"].update({"sources": [{"path": shards}], "batch_size": batch, "num_workers": 0})
    cfg["train"].update({"steps": steps, "progress": False})
    cfg["zero"]["offload_optimizer"] = offload
    cfg["checkpoint"] = {"every": 0, "final": False}
    cfg["tracking"] = {"enabled": False}
    cfg["run_dir"] = str(run_dir)
    path = tmp / f"offload_{offload}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp / f"offload_{offload}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", str(path), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"offload={offload}: run failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in ln]
    est = _estimate(load_run_config(str(path), []), 2)
    later = rows[1:] or rows
    return {"offload_optimizer": offload, "steps": len(rows), "batch_per_rank": batch,
            "peak_rss_per_rank": [r["peak_rss"] for r in ranks], "estimate_per_rank": est["per_rank"],
            "params": est["params"], "ratio_measured_over_estimate": max(r["peak_rss"] for r in ranks) / est["per_rank"],
            "step_time_s": statistics.median(r["step_time_s"] for r in later),
            "mfu": statistics.median(r["mfu"] for r in later)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="image+text shard directory")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "zero3_large.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="zero3_large_") as tmp:
        for offload in (False, True):
            r = bench(args.shards, args.steps, args.batch, offload, Path(tmp))
            results.append(r)
            print(f"offload_optimizer={str(offload).lower():5} params {r['params']:,}  peak RSS/rank "
                  f"{max(r['peak_rss_per_rank']) / 2**30:.2f} GiB  estimate {r['estimate_per_rank'] / 2**30:.2f} GiB  "
                  f"ratio {r['ratio_measured_over_estimate']:.2f}  step {r['step_time_s']:.1f} s  MFU {r['mfu']:.3f}",
                  flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
