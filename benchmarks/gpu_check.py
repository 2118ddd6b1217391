"""GPU check, kernels to product (one H200, < 8 min): attention, pretrain under torchrun + NCCL, eval, MFU.

    bash benchmarks/gpu_check.sh                # on the GPU machine
    bash benchmarks/gpu_check.sh --cpu-smoke    # the same script on CPU with gloo, tiny sizes (CI runs it)

1. Attention: every backend available (flash_attn, xformers, sdpa) vs the fp32 ``math`` reference, forward and
   backward, plain / key padding / causal / padding+causal, in bf16; then fwd+bwd speed at seq 1024 and 4096.
2. Product: shards built here from package files (medfm.demo.corpus), then ``medfm pretrain`` of the tiny
   multimodal recipe (configs/pretrain/tiny_multimodal.yaml) in bf16 under ``torchrun --nproc_per_node 1`` (NCCL on
   CUDA, gloo on CPU), once ``train.strategy=zero3`` and once ``ddp``, 20 steps; with more than one GPU visible also
   2 ranks of zero3; then ``medfm eval`` of the zero3 checkpoint (linear probe, kNN, zero-shot, retrieval).
3. MFU: one ViT-L/16 MAE training step (bf16 autocast, AdamW) against the peak of medfm.pretrain.peak_flops
   (``--peak-tflops``, else the GPU's published dense bf16 peak).
One line per check (PASS / FAIL / SKIP and what was measured), the exit status is 1 if any check failed; the rows
also go to JSON (--out). Backends that are not installed are SKIP lines, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
from medfm.pretrain.peak_flops import mfu_peak  # noqa: E402
from medfm.pretrain.world_env import env_outside_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
            rows.append({"check": "speed", "backend": backend, "case": f"seq{n}", "status": "skipped (not installed)"})
            continue
        for case, pad in (("plain", None), ("padding", kpm)):
            def step(backend=backend, pad=pad):
                attention(q, k, v, key_padding_mask=pad, backend=backend).sum().backward()

            sec = _timed(step, dev, iters)
            rows.append({"check": "speed", "backend": backend, "case": f"{case} seq{n}", "ms": sec * 1e3,
                         "tflops": flops / sec / 1e12, "status": "ok"})


def check_mfu(dev, smoke, peak_tflops, rows):
    if smoke:
        arch, over = "vit2d_large_p16", {"img_size": 32, "width": 64, "depth": 2, "num_heads": 4}
        batch, dec, iters = 2, {"width": 32, "depth": 1, "num_heads": 2}, 2
    else:
        arch, over, batch, dec, iters = "vit2d_large_p16", {}, 128, {"width": 512, "depth": 8, "num_heads": 16}, 10
    tower = create(arch, **over).to(dev)
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
    peak, source = mfu_peak(peak_tflops, dev, torch.bfloat16)
    mfu = achieved / peak if peak else None
    ok = math.isfinite(achieved) and (mfu is None or 0 < mfu <= 1)  # above 1: the FLOP count or the peak is wrong
    rows.append({"check": "mfu", "backend": "auto", "case": f"{arch} MAE bs{batch} {size}px", "ms": sec * 1e3,
                 "tflops": achieved / 1e12, "mfu": mfu, "peak": source, "status": "ok" if ok else "MISMATCH"})


# ---------------------------------------------------------------------------------------------- the product
def _env():
    # Every check starts a world of its own (torchrun --standalone, or a lone medfm eval): a world this script was
    # started inside (a notebook, a test process that trained in-process) must not be joined or collided with.
    env = env_outside_world(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _cli(args: list[str], log: Path, timeout: int, nproc: int | None = None) -> tuple[int, float]:
    """``medfm ARGS`` (under ``torchrun --standalone --nproc_per_node NPROC`` when given); output to ``log``."""
    cmd = [sys.executable, "-m", "medfm.launch.cli", *args]
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "medfm.launch.cli", *args]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.call(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _tail(log: Path, n: int = 2) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.is_file() else []
    return " | ".join(lines[-n:])[-300:]


def build_corpus(work: Path, rows) -> dict | None:
    from medfm.demo.corpus import build_demo_corpus

    t0 = time.perf_counter()
    try:
        corpus = build_demo_corpus(work / "corpus", salt="medfm-gpu-check", workers=4, progress=False,
                                   log=lambda msg: None)
    except Exception as exc:  # noqa: BLE001 - one FAIL line, the rest of the checks still run
        rows.append({"check": "shards", "backend": "-", "case": "demo corpus", "status": f"FAIL {exc}"[:300]})
        return None
    n = sum(c["samples"] for c in corpus["counts"].values())
    rows.append({"check": "shards", "backend": "-", "case": f"demo corpus {n} samples", "status": "ok",
                 "ms": (time.perf_counter() - t0) * 1e3})
    return corpus


def pretrain_overrides(corpus: dict, run_dir: Path, strategy: str, steps: int) -> list[str]:
    """The tiny multimodal recipe on the package-file corpus, bf16, ``steps`` steps, a checkpoint at the end."""
    ds = corpus["datasets"]
    sources = [{"path": str(Path(ds[name]).resolve()), "name": name} for name in ("mri2d", "mri3d", "ecg", "ehr")]
    return [f"run_dir={run_dir}", f"data.sources={json.dumps(sources)}", "data.num_workers=0",
            f"train.steps={steps}", "train.precision=bf16", f"train.strategy={strategy}", "train.log_every=1",
            "train.progress=false", f"checkpoint.every={steps}", "checkpoint.final=true", "tracking.enabled=false"]


def check_pretrain(corpus, work: Path, strategy: str, nproc: int, steps: int, rows, timeout: int) -> Path | None:
    run_dir = work / f"run_{strategy}_{nproc}rank"
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch run: a fresh run refuses old checkpoints
    case = f"tiny_multimodal bf16 {strategy} x{nproc}"
    log = work / f"pretrain_{strategy}_{nproc}.log"
    rc, sec = _cli(["pretrain", str(ROOT / "configs/pretrain/tiny_multimodal.yaml"),
                    *pretrain_overrides(corpus, run_dir, strategy, steps)], log, timeout, nproc=nproc)
    metrics = run_dir / "metrics.jsonl"
    got = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    last = got[-1] if got else {}
    finite = all(math.isfinite(v) for r in got for k, v in r.items() if k.startswith("loss/"))
    ok = rc == 0 and last.get("step") == steps and finite and (run_dir / "checkpoints" / "latest").is_file()
    mfu = last.get("mfu", last.get("mfu_vs_measured_matmul"))
    peak = "measured_matmul" if "mfu_vs_measured_matmul" in last else "published/declared" if "mfu" in last else None
    rows.append({"check": "pretrain", "backend": "nccl" if torch.cuda.is_available() else "gloo", "case": case,
                 "ms": sec * 1e3, "mfu": mfu, "loss": last.get("loss/total"), "peak": peak,
                 "status": "ok" if ok else f"FAIL rc={rc} step={last.get('step')} finite={finite}: {_tail(log)}"})
    return run_dir if ok else None


def eval_suite(corpus: dict, work: Path) -> Path:
    """A small suite on the corpus: the demo's suite writer with fewer protocols and bootstrap resamples."""
    from medfm.demo.recipes import eval_suite as write_suite

    return write_suite(corpus, work, {"mri2d_tissue": ("logistic", "knn", "zeroshot", "retrieval"),
                                      "ecg_rhythm": ("logistic",)}, name="gpu_check", n_boot=50, batch_size=64)


def check_eval(corpus, run_dir: Path, work: Path, rows, timeout: int) -> None:
    out = work / "eval"
    shutil.rmtree(out, ignore_errors=True)
    log = work / "eval.log"
    rc, sec = _cli(["eval", str(run_dir / "checkpoints"), "--suite", str(eval_suite(corpus, work)), "--out",
                    str(out)], log, timeout)
    report = out / "report.json"
    results = json.loads(report.read_text()).get("tasks", []) if report.is_file() else []
    by_name = {r.get("task"): r for r in results if isinstance(r, dict)}
    failed = sorted(f"{n}: {r.get('error')}"[:200] for n, r in by_name.items() if r.get("status") != "ok")
    zs = by_name.get("mri2d_tissue_zeroshot", {})
    ok = rc == 0 and len(by_name) == 5 and not failed and zs.get("status") == "ok"
    rows.append({"check": "eval", "backend": "-", "case": f"{len(by_name)} tasks incl. zero-shot", "ms": sec * 1e3,
                 "status": "ok" if ok else f"FAIL rc={rc} tasks={sorted(by_name)} failed={failed}: {_tail(log)}"})


def _print(rows):
    for r in rows:
        def f(key, fmt, r=r):
            return f" {key}={format(r[key], fmt)}" if r.get(key) is not None else ""

        status = r["status"]
        word = "PASS" if status == "ok" else "SKIP" if status.startswith("skipped") else "FAIL"
        detail = "" if word == "PASS" else f" ({status})"
        print(f"{word} {r['check']:8} {r['backend']:10} {r['case']:38}{f('fwd_err', '.2e')}{f('bwd_err', '.2e')}"
              f"{f('ms', '.1f')}{f('tflops', '.2f')}{f('mfu', '.3f')}{f('loss', '.3f')}"
              f"{' peak=' + r['peak'] if r.get('peak') else ''}{detail}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU with gloo (checks the script runs)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--work", default=None, help="scratch directory (shards, runs, logs); default: a temp dir")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="declared per-GPU peak for MFU (default: table)")
    ap.add_argument("--steps", type=int, default=None, help="pretrain steps (default 20; 4 with --cpu-smoke)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: running the CPU smoke version")
    dev = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    steps = args.steps or (4 if smoke else 20)
    work = Path(args.work or tempfile.mkdtemp(prefix="medfm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    n_rows = 0

    def flush():
        nonlocal n_rows
        _print(rows[n_rows:])
        n_rows = len(rows)

    check_equality(dev, dtype, (2, 2, 64, 16) if smoke else (4, 12, 1024, 64), rows)
    flush()
    for n in ((64, 128) if smoke else (1024, 4096)):
        check_speed(dev, dtype, (2, 2, n, 16) if smoke else (8 if n <= 1024 else 2, 16, n, 64), 2 if smoke else 10,
                    rows)
    flush()
    corpus = build_corpus(work, rows)
    flush()
    if corpus is not None:
        timeout = 600 if smoke else 150
        zero3 = check_pretrain(corpus, work, "zero3", 1, steps, rows, timeout)
        flush()
        check_pretrain(corpus, work, "ddp", 1, steps, rows, timeout)
        flush()
        if not smoke and torch.cuda.device_count() > 1:
            check_pretrain(corpus, work, "zero3", 2, steps, rows, timeout)
        else:
            rows.append({"check": "pretrain", "backend": "-", "case": "tiny_multimodal bf16 zero3 x2",
                         "status": f"skipped ({torch.cuda.device_count()} GPU visible)"})
        flush()
        if zero3 is not None:
            check_eval(corpus, zero3, work, rows, 600 if smoke else 120)
        else:
            rows.append({"check": "eval", "backend": "-", "case": "zero3 checkpoint",
                         "status": "FAIL no checkpoint (pretrain zero3 failed)"})
        flush()
    check_mfu(dev, smoke, args.peak_tflops, rows)
    flush()
    bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    print(f"total {time.perf_counter() - t0:.1f}s on {dev} ({'smoke' if smoke else 'full'}); work dir {work}; "
          f"{len(bad)} failed")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
