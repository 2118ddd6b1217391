"""Speed side by side with the references, as ratios with min/median/max over repeated runs (issue #9).

    python benchmarks/peers.py [--repeats 3] [--steps 30] [--compile] [--skip-loader] [--loader-full]
                               [--workers 1,2] [--json out.json]

- ``clip``: medfm's training loop (``medfm.pretrain.train.run``, strategy ddp, world of one) vs open_clip's own
  (``open_clip_train.train.train_one_epoch``) on the same tiny ViT + text CLIP and the same synthetic batch stream
  (benchmarks/peers/train_loop.py), each in its own process — medfm in .venv, open_clip in .venv-peers
  (``make peers``) — alternated within one run. Ratio = medfm samples/s / open_clip samples/s (target >= 1.2);
  peak RSS of each process beside it. ``--compile`` adds a third process per repeat: medfm with train.compile.
- ``loader``: benchmarks/loader.py (the loader engineer's benchmark, reused unchanged) run ``--repeats`` times;
  per (modality, workers) row the medfm / plain-webdataset ratio (target >= 0.95) and, for volumes, shards / MONAI
  on-the-fly (target >= 10).
Numbers go to stdout as a markdown table and, with ``--json``, as raw runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"


def _run_json_lines(cmd, timeout=900) -> list[dict]:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def spread(values) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def bench_clip(repeats: int, steps: int, batch: int, compile_towers: bool) -> dict:
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} missing: run `make peers` first")
    script = REPO / "benchmarks" / "peers" / "train_loop.py"
    impls = ("medfm", "open_clip") + (("medfm+compile",) if compile_towers else ())
    runs = {k: [] for k in impls}
    for i in range(repeats):
        order = impls if i % 2 == 0 else impls[::-1]  # alternate: load drift cancels
        for impl in order:
            py = PEER_PYTHON if impl == "open_clip" else sys.executable
            cmd = [str(py), str(script), "--impl", impl.split("+")[0], "--steps", str(steps), "--batch", str(batch)]
            # compiled: the first step is the eager FLOP count, the second compiles; both stay out of the timing
            runs[impl] += _run_json_lines(cmd + (["--compile", "--warmup", "5"] if "+" in impl else []))
            print(json.dumps(runs[impl][-1]), flush=True)
    ratios = {k: [m["samples_s"] / o["samples_s"] for m, o in zip(runs[k], runs["open_clip"])]
              for k in impls if k != "open_clip"}
    cpu_ratios = {k: [m["samples_cpu_s"] / o["samples_cpu_s"] for m, o in zip(runs[k], runs["open_clip"])]
                  for k in impls if k != "open_clip"}
    return {"runs": runs, "ratios": ratios, "cpu_ratios": cpu_ratios}


def bench_loader(repeats: int, quick: bool, workers: str) -> dict:
    rows = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "loader.json"
            cmd = [sys.executable, str(REPO / "benchmarks" / "loader.py"), "--workers", workers, "--repeat", "1",
                   "--json", str(out)] + (["--quick"] if quick else [])
            _run_json_lines(cmd, timeout=1800)
            for r in json.loads(out.read_text()):
                rows.setdefault((r["modality"], r["workers"]), []).append(r)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time medfm with train.compile=true")
    ap.add_argument("--workers", default="1", help="loader workers, e.g. 1,2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--loader-full", action="store_true", help="loader.py's full sizes (slow) instead of --quick")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    clip = bench_clip(args.repeats, args.steps, args.batch, args.compile)
    o = clip["runs"]["open_clip"]
    print("\n| comparison | medfm | reference | ratio min / median / max | target |")
    print("|---|---|---|---|---|")
    for impl, ratios in clip["ratios"].items():
        m = clip["runs"][impl]
        print(f"| CLIP training loop samples/s, {impl} (batch {args.batch}) | "
              f"{statistics.median([r['samples_s'] for r in m]):.0f} | "
              f"open_clip train_one_epoch {statistics.median([r['samples_s'] for r in o]):.0f} | {spread(ratios)} "
              f"| >= 1.2 |")
        print(f"| CLIP training loop samples per CPU-second, {impl} | "
              f"{statistics.median([r['samples_cpu_s'] for r in m]):.0f} | "
              f"open_clip {statistics.median([r['samples_cpu_s'] for r in o]):.0f} | "
              f"{spread(clip['cpu_ratios'][impl])} | - |")
        print(f"| CLIP training loop peak RSS MB, {impl} | {statistics.median([r['peak_rss_mb'] for r in m]):.0f} | "
              f"open_clip {statistics.median([r['peak_rss_mb'] for r in o]):.0f} | "
              f"{spread([a['peak_rss_mb'] / b['peak_rss_mb'] for a, b in zip(m, o)])} | - |")
    result = {"clip": clip}
    if not args.skip_loader:
        rows = bench_loader(args.repeats, quick=not args.loader_full, workers=args.workers)
        for (modality, workers), rs in rows.items():
            print(f"| loader {modality}, {workers} worker(s) samples/s | "
                  f"{statistics.median([r['medfm_samples_s'] for r in rs]):.0f} | plain webdataset "
                  f"{statistics.median([r['wds_samples_s'] for r in rs]):.0f} | {spread([r['ratio'] for r in rs])} "
                  f"| >= 0.95 |")
            if "vs_monai" in rs[0]:
                print(f"| loader volume vs MONAI on-the-fly, {workers} worker(s) | "
                      f"{statistics.median([r['medfm_samples_s'] for r in rs]):.1f} | MONAI "
                      f"{statistics.median([r['monai_samples_s'] for r in rs]):.1f} | "
                      f"{spread([r['vs_monai'] for r in rs])} | >= 10 |")
        result["loader"] = {f"{k[0]}|{k[1]}": v for k, v in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
