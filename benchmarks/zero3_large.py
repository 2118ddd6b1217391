"""ViT-L/16 + MiniLM (configs/image_large.yaml, zero_init on, MiniLM weights loaded under deepspeed.zero.Init) for a
few steps on 2 CPU ranks, ZeRO-3 with and without optimizer offload: measured peak RSS per rank against the dry-run's
per-device estimate (launch/memory.py ``estimate_memory``: model states -- on CPU device and host memory are the
same, so device + host / ranks -- plus activations, ZeRO-3 buffers and the process baseline), step time and MFU
from the run's metrics.jsonl.

    python benchmarks/zero3_large.py --shards DIR [--steps 3] [--batch 2] [--out benchmarks/zero3_large.json]

Each worker also measures, so a miss can be placed: its RSS right after importing torch + deepspeed +
transformers + medfm's trainer (the CPU baseline the estimate states, launch.memory.BASELINE_BYTES), the peak
before and the RSS right after ``deepspeed.initialize`` returns (model built and partitioned, optimizer created),
and the peak during the training steps (a 50 ms RSS sampler).
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
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def _worker(config_path: str, out: str) -> None:
    import deepspeed
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from medfm.pretrain.config import load_run_config
    from medfm.pretrain.train import run

    marks = {"baseline_rss": _rss()}  # imports only: what launch.memory.BASELINE_BYTES["cpu"] states
    steps_peak = [0]
    initialize = deepspeed.initialize

    def timed_initialize(*args, **kwargs):
        result = initialize(*args, **kwargs)
        marks["peak_before_steps"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        marks["rss_after_initialize"] = steps_peak[0] = _rss()
        return result

    def sample(stop: threading.Event):
        while not stop.wait(0.05):
            if "rss_after_initialize" in marks:
                steps_peak[0] = max(steps_peak[0], _rss())

    deepspeed.initialize = timed_initialize
    # The end-of-run MAE figure (pretrain/mae_figure.py) fails at this size under ZeRO-3 in this tree ("Cannot free
    # a ZeRO-3 parameter while it is still active in submodules", the patch embedding, after all steps finished);
    # it is not what this benchmark measures, so it is skipped here (defect reported in notes/issue-15.md).
    import medfm.pretrain.mae_figure as mae_figure

    mae_figure.write_mae_figures = lambda *a, **k: []
    stop = threading.Event()
    threading.Thread(target=sample, args=(stop,), daemon=True).start()
    res = run(load_run_config(config_path, []))
    stop.set()
    import torch.distributed as dist

    rank = dist.get_rank()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(
        {"status": res.status, "peak_rss": peak, "peak_rss_steps": steps_peak[0], **marks}))


def _estimate(cfg, nproc: int) -> dict:
    from medfm.launch.memory import count_model, estimate_memory

    size = count_model(cfg)
    mem = estimate_memory(cfg, size, nproc, 1, device="cpu")
    return {"params": size.total_params, "per_rank": mem.total, "model_states": mem.model_states,
            "activations": mem.activations, "zero3_buffers": mem.zero3, "baseline": mem.baseline}


def _recipe(shards: str, batch: int, offload: bool) -> dict:
    from medfm.schema import read_yaml_mapping

    cfg = read_yaml_mapping(ROOT / "configs" / "image_large.yaml")  # its base: files merged (image_base, common/)
    cfg["data"].update({"sources": [{"path": shards}], "batch_size": batch, "num_workers": 0})
    cfg["zero"]["offload_optimizer"] = offload
    return cfg


def reestimate(out: Path, shards: str) -> None:
    """Recompute the estimate of stored runs with the current launch/memory.py (the measurements stay)."""
    from medfm.pretrain.config import load_run_config

    results = json.loads(out.read_text())
    with tempfile.TemporaryDirectory(prefix="zero3_large_") as tmp:
        for r in results:
            path = Path(tmp) / "run.yaml"
            path.write_text(yaml.safe_dump(_recipe(shards, r["batch_per_rank"], r["offload_optimizer"])))
            est = _estimate(load_run_config(str(path), []), 2)
            peak = max(r["peak_rss_per_rank"])
            r.update({"estimate": est, "estimate_per_rank": est["per_rank"],
                      "ratio_measured_over_estimate": peak / est["per_rank"]})
            print(f"offload_optimizer={str(r['offload_optimizer']).lower():5} peak {peak / 2**30:.2f} GiB  "
                  f"estimate {est['per_rank'] / 2**30:.2f} GiB  ratio {peak / est['per_rank']:.2f}")
    out.write_text(json.dumps(results, indent=1))


def bench(shards: str, steps: int, batch: int, offload: bool, tmp: Path) -> dict:
    from medfm.pretrain.config import load_run_config

    cfg = _recipe(shards, batch, offload)
    run_dir = tmp / f"offload_{offload}"
    cfg["train"].update({"steps": steps, "progress": False})
    cfg["checkpoint"] = {"every": 0, "final": False}
    cfg["tracking"] = {"enabled": False}
    cfg["run_dir"] = str(run_dir)
    path = tmp / f"offload_{offload}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp / f"offload_{offload}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", str(path), str(out)]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        (tmp / f"offload_{offload}.stderr").write_text(proc.stderr)
        raise SystemExit(f"offload={offload}: run failed:\n{proc.stderr[-12000:]}")
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step_time_s"' in ln]
    est = _estimate(load_run_config(str(path), []), 2)
    later = rows[1:] or rows
    return {"offload_optimizer": offload, "steps": len(rows), "batch_per_rank": batch,
            "peak_rss_per_rank": [r["peak_rss"] for r in ranks], "estimate_per_rank": est["per_rank"],
            "params": est["params"], "ratio_measured_over_estimate": max(r["peak_rss"] for r in ranks) / est["per_rank"],
            "estimate": est, "measured": ranks, "started": started,
            "step_time_s": statistics.median(r["step_time_s"] for r in later),
            "mfu": _median_mfu(later)}


def _median_mfu(rows: list[dict]) -> float | None:
    """MFU as the run logged it: ``mfu`` against a published peak, ``mfu_vs_measured_matmul`` against the matmul
    peak the run measured at start (CPU)."""
    for key in ("mfu", "mfu_vs_measured_matmul"):
        if all(key in r for r in rows):
            return statistics.median(r[key] for r in rows)
    return None


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="image+text shard directory")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "zero3_large.json"))
    ap.add_argument("--offload", choices=["both", "off", "on"], default="both",
                    help="which runs (one at a time needs ~7 GiB per rank x 2)")
    ap.add_argument("--reestimate", action="store_true", help="only recompute the estimates stored in --out")
    args = ap.parse_args()
    if args.reestimate:
        reestimate(Path(args.out), args.shards)
        return 0
    results = []
    runs = {"both": (False, True), "off": (False,), "on": (True,)}[args.offload]
    with tempfile.TemporaryDirectory(prefix="zero3_large_") as tmp:
        for offload in runs:
            load = os.getloadavg()
            print(f"offload_optimizer={str(offload).lower()}: load average before {load}", flush=True)
            r = bench(args.shards, args.steps, args.batch, offload, Path(tmp))
            r["loadavg_before"] = load
            results.append(r)
            g = 2**30
            print("  measured per rank: " + "; ".join(
                f"r{i} baseline {m['baseline_rss'] / g:.2f}, after initialize {m['rss_after_initialize'] / g:.2f}, "
                f"peak before steps {m['peak_before_steps'] / g:.2f}, peak in steps {m['peak_rss_steps'] / g:.2f}"
                for i, m in enumerate(r["measured"])) + " GiB", flush=True)
            print(f"offload_optimizer={str(offload).lower():5} params {r['params']:,}  peak RSS/rank "
                  f"{max(r['peak_rss_per_rank']) / 2**30:.2f} GiB  estimate {r['estimate_per_rank'] / 2**30:.2f} GiB  "
                  f"ratio {r['ratio_measured_over_estimate']:.2f}  step {r['step_time_s']:.1f} s  MFU {r['mfu'] or 0:.3f}",
                  flush=True)
    out = Path(args.out)
    old = {r["offload_optimizer"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    old.update({r["offload_optimizer"]: r for r in results})  # one run per call keeps the other's numbers
    out.write_text(json.dumps([old[k] for k in sorted(old)], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
