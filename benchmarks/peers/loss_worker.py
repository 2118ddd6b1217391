"""One rank of the contrastive-loss parity check: the same inputs through medfm's or open_clip's losses.

Runs in either environment: ``--impl medfm`` in .venv (imports medfm.pretrain.losses), ``--impl open_clip`` in
.venv-peers (imports open_clip.loss). Alone it is a 1-process world; under ``torch.distributed.run`` each rank takes
its contiguous slice of the global batch (rows ``rank*B:(rank+1)*B``), exactly as a DistributedSampler-fed data
loader would, and joins a gloo world. Every case writes this rank's loss and the gradients that reached this rank's
leaves (its feature rows, the log temperature, the SigLIP bias, the caption logits) to
``OUT/rank<r>.safetensors`` as ``<case>.<name>``, so tests/test_parity_losses.py can compare the two sides key by key.

Conventions bridged here (and only here): open_clip's losses take the *exponentiated* temperature
(``model.logit_scale.exp()``), medfm's the learnable log temperature; both sides differentiate with respect to the
same leaf, the log temperature.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

# Case name -> constructor keywords. Both sides run every case with the same meaning.
CLIP_CASES = {
    "clip_local": dict(local_loss=True, gather_with_grad=True),
    "clip_global": dict(local_loss=False, gather_with_grad=True),
    "clip_global_nograd": dict(local_loss=False, gather_with_grad=False),
}
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's exchange strategies; medfm has one
COCA = dict(clip_weight=1.0, caption_weight=2.0, pad_id=0)


def _leaves(inputs: dict, rows: slice) -> dict:
    out = {
        "a": inputs["a"][rows].clone().requires_grad_(True),
        "b": inputs["b"][rows].clone().requires_grad_(True),
        "log_scale": inputs["log_scale"].clone().requires_grad_(True),
        "bias": inputs["bias"].clone().requires_grad_(True),
        "cap_logits": inputs["cap_logits"][rows].clone().requires_grad_(True),
    }
    out["cap_targets"] = inputs["cap_targets"][rows].clone()
    return out


def _record(results: dict, case: str, loss: torch.Tensor, leaves: dict, names) -> None:
    params = [leaves[n] for n in names]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    results[f"{case}.loss"] = loss.detach().reshape(1).clone()
    for name, g in zip(names, grads):
        results[f"{case}.grad_{name}"] = torch.zeros_like(leaves[name]) if g is None else g.detach().clone()


def run_medfm(inputs: dict, rows: slice, rank: int, world: int) -> dict:
    from medfm.pretrain.losses import ClipLoss, CoCaLoss, SigLipLoss

    results: dict = {}
    for case, kw in CLIP_CASES.items():
        x = _leaves(inputs, rows)
        loss = ClipLoss(**kw)(x["a"], x["b"], x["log_scale"])
        _record(results, case, loss, x, ("a", "b", "log_scale"))
    for impl in SIGLIP_IMPLS:  # medfm has a single exchange; it is compared against every open_clip strategy
        x = _leaves(inputs, rows)
        loss = SigLipLoss()(x["a"], x["b"], x["log_scale"], x["bias"])
        _record(results, f"siglip_{impl}", loss, x, ("a", "b", "log_scale", "bias"))
    x = _leaves(inputs, rows)
    coca = CoCaLoss(clip_weight=COCA["clip_weight"], caption_weight=COCA["caption_weight"], pad_id=COCA["pad_id"],
                    contrastive=ClipLoss(local_loss=True, gather_with_grad=True))
    out = coca(x["a"], x["b"], x["log_scale"], x["cap_logits"], x["cap_targets"])
    _record(results, "coca", out["total"], x, ("a", "b", "log_scale", "cap_logits"))
    return results


def run_open_clip(inputs: dict, rows: slice, rank: int, world: int) -> dict:
    from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

    results: dict = {}
    for case, kw in CLIP_CASES.items():
        x = _leaves(inputs, rows)
        loss = ClipLoss(rank=rank, world_size=world, **kw)(x["a"], x["b"], x["log_scale"].exp())
        _record(results, case, loss, x, ("a", "b", "log_scale"))
    for impl in SIGLIP_IMPLS:
        x = _leaves(inputs, rows)
        loss = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(x["a"], x["b"], x["log_scale"].exp(),
                                                                       x["bias"])
        _record(results, f"siglip_{impl}", loss, x, ("a", "b", "log_scale", "bias"))
    x = _leaves(inputs, rows)
    coca = CoCaLoss(caption_loss_weight=COCA["caption_weight"], clip_loss_weight=COCA["clip_weight"],
                    pad_id=COCA["pad_id"], local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    clip_part, caption_part = coca(x["a"], x["b"], x["cap_logits"], x["cap_targets"], x["log_scale"].exp())
    _record(results, "coca", clip_part + caption_part, x, ("a", "b", "log_scale", "cap_logits"))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=("medfm", "open_clip"), required=True)
    ap.add_argument("--inputs", required=True, help="safetensors with a, b, log_scale, bias, cap_logits, cap_targets")
    ap.add_argument("--out", required=True, help="directory for rank<r>.safetensors")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    inputs = load_file(args.inputs)
    n = inputs["a"].shape[0]
    if n % world:
        raise SystemExit(f"loss_worker: global batch {n} is not divisible by world size {world}")
    per_rank = n // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    run = run_medfm if args.impl == "medfm" else run_open_clip
    results = run(inputs, rows, rank, world)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in results.items()}, str(out / f"rank{rank}.safetensors"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
