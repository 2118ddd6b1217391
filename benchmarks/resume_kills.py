"""Exact resume under random rank kills, for the record: the demo's multimodal recipe shrunk to CPU seconds
(tests/pretrain_support.demo_like_config: three sources, round-robin groups, every objective, ZeRO-3, 2 ranks)
trained once uninterrupted, then ``--trials`` times with one SIGKILL each at a random step of a random rank under
``medfm launch --max-restarts 1``. A trial counts as exact when its final consolidated fp32 weights equal the
uninterrupted run's bit for bit.

    python benchmarks/resume_kills.py [--trials 10] [--steps 12] [--every 3] [--seed S] [--out DIR]

Prints one line per trial and ``exact: k/N``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pretrain_support import demo_like_config, final_weights, launch_with_kills  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill draws (default: random)")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="medfm-kills-"))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    print(f"work dir {out}; kill draws seed {seed}", flush=True)
    t0 = time.time()
    ref = launch_with_kills(demo_like_config(out / "shards", out / "ref", args.steps, args.every), out, [])
    if ref.returncode != 0:
        print(ref.stdout[-4000:])
        return 1
    want = final_weights(out / "ref")
    print(f"reference: {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
    exact = 0
    for i in range(args.trials):
        kill = (rng.randrange(1, args.steps), rng.randrange(2))
        run_dir = out / f"trial{i}"
        t = time.time()
        proc = launch_with_kills(demo_like_config(out / "shards", run_dir, args.steps, args.every), out, [kill])
        fired = f"after step {kill[0]}; SIGKILL rank {kill[1]}" in proc.stdout
        ok = proc.returncode == 0 and fired
        if ok:
            got = final_weights(run_dir)
            ok = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
        exact += ok
        print(f"trial {i}: kill rank {kill[1]} after step {kill[0]}: rc {proc.returncode}, fired {fired}, "
              f"{'bit-exact' if ok else 'DIFFERENT'} ({time.time() - t:.0f} s)", flush=True)
    print(f"exact: {exact}/{args.trials}")
    return 0 if exact == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
