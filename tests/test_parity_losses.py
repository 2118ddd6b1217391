"""medfm's contrastive losses vs open_clip's own (open_clip.loss, run in .venv-peers), values and gradients.

Both sides run benchmarks/peers/loss_worker.py on one safetensors file of inputs, alone and as a 2-process gloo world
(each rank its slice of the global batch), and every loss and gradient is compared rank by rank. The one intended
difference is asserted, not hidden: with ``local_loss=False, gather_with_grad=False`` open_clip's features receive
only their local slice's gradient, medfm's receive W times that (medfm's contract: after DDP's gradient average the
update equals the single-process one; open_clip's is W times too small in that configuration).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peers.parity_env import PEERS_DIR, medfm_python, peer_python, run_script
from safetensors.torch import load_file, save_file

WORKER = PEERS_DIR / "loss_worker.py"
N, D, T, V = 8, 16, 6, 11  # global batch, embed dim, caption length, vocab
RTOL, ATOL = 2e-5, 2e-6  # float32 on both sides; two torch builds may order reductions differently


def _inputs(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    # b correlated with a, so the positives matter and the loss is far from log(N)
    b = torch.nn.functional.normalize(a + 0.7 * torch.randn(N, D, generator=g), dim=-1)
    targets = torch.randint(1, V, (N, T), generator=g)
    targets[:, -2:] = 0  # pad id 0 at the tail of every caption (equal per rank: see test_coca_world_note)
    targets[1, 2:] = 0
    targets[5, 2:] = 0  # one shorter caption on each rank of the 2-rank world
    tensors = {
        "a": a.contiguous(), "b": b.contiguous(),
        "log_scale": torch.tensor([math.log(1 / 0.07)]),  # CLIP's init: scale 14.3
        "bias": torch.tensor([-2.5]),
        "cap_logits": torch.randn(N, T, V, generator=g),
        "cap_targets": targets,
    }
    save_file(tensors, str(path))
    return tensors


def _run_both(tmp_path, nproc):
    inputs = tmp_path / "inputs.safetensors"
    _inputs(inputs)
    peer = peer_python()
    run_script(peer, WORKER, ["--impl", "open_clip", "--inputs", inputs, "--out", tmp_path / "open_clip"], nproc=nproc)
    run_script(medfm_python(), WORKER, ["--impl", "medfm", "--inputs", inputs, "--out", tmp_path / "medfm"],
               nproc=nproc)
    return [(load_file(str(tmp_path / "medfm" / f"rank{r}.safetensors")),
             load_file(str(tmp_path / "open_clip" / f"rank{r}.safetensors"))) for r in range(nproc)]


def _assert_same(ours, theirs, keys, scale=1.0):
    assert keys, "no keys to compare"
    for k in keys:
        assert k in ours and k in theirs, f"{k} missing (medfm has {k in ours}, open_clip has {k in theirs})"
        np.testing.assert_allclose(ours[k].numpy(), scale * theirs[k].numpy(), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{k}: medfm != {scale} x open_clip")


def _case_keys(results, case):
    return sorted(k for k in results if k.startswith(case + "."))


def _check_world(pairs, world):
    for rank, (ours, theirs) in enumerate(pairs):
        assert set(ours) == set(theirs), f"rank {rank}: key sets differ: {set(ours) ^ set(theirs)}"
        for case in ("clip_local", "clip_global", "coca", "siglip_bidir", "siglip_shift", "siglip_reduce",
                     "siglip_gather"):
            _assert_same(ours, theirs, _case_keys(ours, case))
        # The documented difference: feature gradients are W x open_clip's, loss and temperature gradient equal.
        nograd = _case_keys(ours, "clip_global_nograd")
        _assert_same(ours, theirs, [k for k in nograd if not k.endswith(("grad_a", "grad_b"))])
        _assert_same(ours, theirs, [k for k in nograd if k.endswith(("grad_a", "grad_b"))], scale=float(world))
        # Guard against a vacuous pass: the compared numbers are real losses with non-zero gradients.
        assert 0.1 < float(ours["clip_local.loss"]) < 10
        assert float(ours["clip_local.grad_a"].abs().max()) > 1e-3
        assert float(ours["siglip_bidir.grad_bias"].abs().max()) > 1e-3
        assert float(ours["coca.grad_cap_logits"].abs().max()) > 1e-4


def test_losses_match_open_clip_single_process(tmp_path):
    _check_world(_run_both(tmp_path, 1), world=1)


@pytest.mark.slow
def test_losses_match_open_clip_two_rank_gloo(tmp_path):
    pairs = _run_both(tmp_path, 2)
    _check_world(pairs, world=2)
    # The ranks really saw different rows (a broken slice would make both ranks identical and still "match").
    assert not torch.allclose(pairs[0][0]["clip_local.loss"], pairs[1][0]["clip_local.loss"])
