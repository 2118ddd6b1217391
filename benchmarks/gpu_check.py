"""GPU check for the model zoo (one H200, < 8 min): attention backends equal + fast, and MFU of a ViT MAE step.

    bash benchmarks/gpu_check.sh                # on the GPU machine
    bash benchmarks/gpu_check.sh --cpu-smoke    # tiny shapes on CPU: proves the script itself runs

1. Equality: every backend available (flash_attn, xformers, sdpa) vs the fp32 ``math`` reference, forward and
   backward, plain / key padding / causal / padding+causal, in bf16.
2. Speed: forward+backward ms per backend at ViT-ish shapes.
3. MFU: one MAE training step (ViT-B/16 encoder, 512x8 decoder, AdamW, bf16 autocast) -> achieved TFLOP/s from the
   analytic FLOPs (medfm.model_zoo.flops) / the H200's dense bf16 peak.
Backends that are not installed are listed as skipped, never silently dropped. Results: a table on stdout and JSON
(--out).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _ensure_medfm_importable():
    """Run from a bare checkout too: setup.py maps medfm -> medfm_pkg/ and medfm.<part> -> <part>/, so put the
    repository root on the bare package's __path__ when medfm is not installed."""
    try:
        import medfm.model_zoo  # noqa: F401
    except ImportError:
        import importlib.util
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location("medfm", root / "medfm_pkg" / "__init__.py",
                                                      submodule_search_locations=[str(root / "medfm_pkg"), str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["medfm"] = module
        spec.loader.exec_module(module)


_ensure_medfm_importable()

from medfm.model_zoo import create  # noqa: E402
from medfm.model_zoo.attention import BACKENDS, attention, available_backends  # noqa: E402
from medfm.model_zoo.flops import mae_forward_flops, train_flops  # noqa: E402
from medfm.model_zoo.mae import decoder_for  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, iters, warmup=3):
    for _ in range(warmup):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / iters


def check_equality(dev, dtype, shape, rows):
    b, h, n, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev, dtype) for _ in range(3))
    kpm = torch.ones(b, n, dtype=torch.bool, device=dev)
    kpm[b // 2 :, n - n // 3 :] = False
    have = available_backends(dev, dtype)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    for backend in [x for x in BACKENDS if x not in ("auto", "math")]:
        if backend not in have:
            rows.append({"check": "equal", "backend": backend, "case": "-", "status": "skipped (not installed / "
                         "needs CUDA fp16/bf16)"})
            continue
        for case, pad, causal in (("plain", None, False), ("padding", kpm, False), ("causal", None, True),
                                  ("padding+causal", kpm, True)):
            qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            qr, kr, vr = (t.detach().float().clone().requires_grad_(True) for t in (q, k, v))
            out = attention(qs, ks, vs, key_padding_mask=pad, causal=causal, backend=backend)
            ref = attention(qr, kr, vr, key_padding_mask=pad, causal=causal, backend="math")
            gout = torch.randn_like(ref)
            out.backward(gout.to(dtype))
            ref.backward(gout)
            fwd = (out.float() - ref).abs().max().item()
            bwd = max((a.grad.float() - r.grad).abs().max().item() for a, r in ((qs, qr), (ks, kr), (vs, vr)))
            ok = fwd <= tol * 4 and bwd <= tol * 8
            rows.append({"check": "equal", "backend": backend, "case": case, "fwd_err": fwd, "bwd_err": bwd,
                         "status": "ok" if ok else "MISMATCH"})


def check_speed(dev, dtype, shape, iters, rows):
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    kpm = torch.ones(b, n, dtype=torch.bool, device=dev)
    kpm[:, -n // 4 :] = False
    flops = 4 * b * h * n * n * d * 3  # fwd (QK, AV) + bwd (~2x)
    for backend in [x for x in BACKENDS if x != "auto"]:
        if backend not in available_backends(dev, dtype):
            rows.append({"check": "speed", "backend": backend, "case": "-", "status": "skipped (not installed)"})
            continue
        for case, pad in (("plain", None), ("padding", kpm)):
            def step(backend=backend, pad=pad):
                attention(q, k, v, key_padding_mask=pad, backend=backend).sum().backward()

            sec = _timed(step, dev, iters)
            rows.append({"check": "speed", "backend": backend, "case": case, "ms": sec * 1e3,
                         "tflops": flops / sec / 1e12, "status": "ok"})


def check_mfu(dev, smoke, rows):
    if smoke:
        over = {"img_size": 32, "width": 64, "depth": 2, "num_heads": 4}
        batch, dec, iters = 2, {"width": 32, "depth": 1, "num_heads": 2}, 2
    else:
        over, batch, dec, iters = {}, 256, {"width": 512, "depth": 8, "num_heads": 16}, 10
    tower = create("vit2d_base_p16", **over).to(dev)
    decoder = decoder_for(tower, **dec).to(dev)
    params = list(tower.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    size = tower.cfg.img_size
    x = torch.randn(batch, 3, size, size, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step():
        with amp:
            latent, mask, ids = tower.forward_masked(x, 0.75)
            pred = decoder(latent, ids)
            loss = (((pred.float() - tower.patchify(x)) ** 2).mean(-1) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timed(step, dev, iters, warmup=2)
    flops = train_flops(mae_forward_flops(tower, 0.75, decoder_width=dec["width"], decoder_depth=dec["depth"])) * batch
    achieved = flops / sec
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((p for k, p in PEAK_BF16.items() if k in name), None)
    rows.append({"check": "mfu", "backend": "auto", "case": f"vit2d_base_p16 MAE bs{batch} {size}px",
                 "ms": sec * 1e3, "tflops": achieved / 1e12, "mfu": (achieved / peak) if peak else None,
                 "device": name, "status": "ok"})


def _print(rows):
    print(f"{'check':7} {'backend':11} {'case':32} {'fwd_err':>9} {'bwd_err':>9} {'ms':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6}  status")
    for r in rows:
        def f(key, fmt, r=r):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        print(f"{r['check']:7} {r['backend']:11} {r['case']:32} {f('fwd_err', '9.2e'):>9} {f('bwd_err', '9.2e'):>9} "
              f"{f('ms', '9.2f'):>9} {f('tflops', '8.2f'):>8} {f('mfu', '6.1%'):>6}  {r['status']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: running the CPU smoke version")
    dev = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    rows: list[dict] = []
    t0 = time.perf_counter()
    check_equality(dev, dtype, (2, 2, 64, 16) if smoke else (4, 12, 1024, 64), rows)
    check_speed(dev, dtype, (2, 2, 64, 16) if smoke else (32, 12, 1024, 64), 2 if smoke else 20, rows)
    check_mfu(dev, smoke, rows)
    _print(rows)
    print(f"total {time.perf_counter() - t0:.1f}s on {dev} ({'smoke' if smoke else 'full'})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if any(r["status"] == "MISMATCH" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
