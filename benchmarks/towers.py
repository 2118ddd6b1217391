"""Params, forward FLOPs/sample and CPU forward+backward samples/s of every tiny/small tower at native input size.

    .venv/bin/python benchmarks/towers.py [--batch 2] [--iters 3] [--models vit2d_tiny_p16,...] [--threads 2]

Prints a Markdown table (copied into docs/notes/model_zoo.md). FLOPs are the analytic per-sample forward FLOPs of
medfm.model_zoo.flops (equal to torch's FlopCounterMode, see tests/test_model_zoo_flops.py); EHR uses 256 events,
text 128 tokens, signal 12 leads x 5000 samples, volume 96^3 (or 32x192x192 for p4x16).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm import tqdm

from medfm.model_zoo import create
from medfm.model_zoo.flops import count_params, default_input_shape, forward_flops

DEFAULT = ["vit2d_tiny_p16", "vit2d_small_p16", "vit3d_tiny", "vit3d_small", "signal_tiny", "signal_small",
           "ehr_tiny", "ehr_small", "text_bert_tiny", "text_bert_small", "text_minilm"]


def _inputs(tower, batch):
    shape = default_input_shape(tower.cfg)
    m = tower.modality
    if m == "ehr":
        n = shape[0]
        return (torch.randint(2, tower.cfg.vocab_size, (batch, n)),), {
            "ehr_times": -torch.rand(batch, n) * 365, "ehr_values": torch.randn(batch, n),
            "ehr_has_value": torch.rand(batch, n) > 0.5, "ehr_valid": torch.ones(batch, n, dtype=torch.bool)}
    if m == "text":
        n = shape[0]
        return (torch.randint(1000, 2000, (batch, n)),), {"attention_mask": torch.ones(batch, n, dtype=torch.bool)}
    if m == "signal":
        return (torch.randn(batch, *shape),), {"signal_valid": torch.ones(batch, shape[1], dtype=torch.bool),
                                               "signal_leads": torch.ones(batch, shape[0], dtype=torch.bool)}
    return (torch.randn(batch, *shape),), {}


def bench(name, batch, iters):
    tower = create(name).train()
    args, kwargs = _inputs(tower, batch)

    def step():
        tower.zero_grad(set_to_none=True)
        tower.pool(tower(*args, **kwargs), **kwargs).square().mean().backward()

    step()  # warm-up (allocations, lazy inits)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sec = (time.perf_counter() - t0) / iters
    shape = default_input_shape(tower.cfg)
    return {"name": name, "modality": tower.modality, "input": "x".join(map(str, shape)),
            "params": count_params(tower), "gflops": forward_flops(tower, shape) / 1e9, "samples_s": batch / sec}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(DEFAULT))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rows = [bench(n, args.batch, args.iters) for n in tqdm(args.models.split(","), desc="towers")]
    print(f"\nCPU forward+backward, batch {args.batch}, {args.threads} threads, torch {torch.__version__}\n")
    print("| model | modality | input/sample | params | fwd GFLOPs/sample | fwd+bwd samples/s |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['modality']} | {r['input']} | {r['params'] / 1e6:.2f} M | {r['gflops']:.2f} | "
              f"{r['samples_s']:.2f} |")


if __name__ == "__main__":
    main()
