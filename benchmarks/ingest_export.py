"""The messy export (every test file pydicom, pydicom-data and nibabel ship, in patient/study folders) through
``medfm shards build`` with 1 and with 2 worker processes: inputs, written, skipped by reason, wall time, samples/s
and the 2-worker / 1-worker ratio measured in the same run.

    python benchmarks/ingest_export.py [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    from medfm.shards import realdata
    from medfm.shards.manifest import load_manifest

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "export"
        files = realdata.write_messy_export(src)
        size = sum(f.stat().st_size for f in files)
        print(f"export: {len(files)} files, {size / 1e6:.1f} MB")
        env = {**os.environ, "MEDFM_DEID_SALT": "benchmark-salt-0123456789"}
        base = None
        for w in args.workers:
            out = Path(tmp) / f"out{w}"
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "medfm.launch.cli", "shards", "build", str(src), "--out",
                                str(out), "--quiet", "--workers", str(w)], capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                print(f"workers={w}: exit {r.returncode}\n{r.stderr[-2000:]}")
                continue
            m = load_manifest(out)
            n = m["totals"]["samples"]
            base = base or (n / wall)
            print(f"workers={w}: wall {wall:.1f} s, {n} samples, {n / wall:.2f} samples/s "
                  f"({n / wall / w:.2f} per worker), x{n / wall / base:.2f} vs the first row")
            print(f"  inputs: {m['sources']['inputs']}")
            print(f"  skipped by reason: {m['skipped']}")
            print(f"  reports: {m['sources'].get('reports')}; warnings: {sum(m['warnings'].values())} "
                  f"of {len(m['warnings'])} kinds; traceback in log: {'Traceback' in r.stderr}")


if __name__ == "__main__":
    main()
