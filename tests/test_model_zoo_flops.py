"""Analytic params / forward FLOPs equal what torch counts, for every registered architecture."""

import pytest
import torch

from medfm.model_zoo import create, list_models
from medfm.model_zoo.flops import (
    count_params,
    forward_flops,
    mae_forward_flops,
    measure_flops,
    param_count,
    train_flops,
)
from medfm.model_zoo.mae import decoder_for

SHRINK = {"width": 32, "depth": 2, "num_heads": 2}


def _tiny(name):
    """Small overrides of the same architecture family plus a per-sample input of the right modality."""
    if name.startswith("vit2d"):
        p = 14 if name.endswith("p14") else 16
        return dict(SHRINK, img_size=2 * p, num_registers=1), (3, 2 * p, 3 * p)
    if name.startswith("vit3d"):
        ps = [4, 16, 16] if "p4x16" in name else [16, 16, 16]
        return dict(SHRINK, img_size=[2 * ps[0], 32, 32], patch_size=ps, pos_embed="learned"), (1, 2 * ps[0], 32, 48)
    if name.startswith("signal"):
        return dict(SHRINK, n_leads=3, patch_size=10, max_len=100), (3, 95)
    if name.startswith("ehr"):
        return dict(SHRINK, vocab_size=50), (11,)
    if name == "text_minilm":
        return {}, (9,)
    return {"width": 32, "depth": 2, "num_heads": 2, "intermediate_size": 64}, (9,)


def _input(name, shape):
    if name.startswith("ehr"):
        n = shape[0]
        return (torch.randint(0, 50, (1, n)),), {"ehr_times": torch.rand(1, n), "ehr_values": torch.rand(1, n)}
    if name.startswith("text"):
        return (torch.randint(0, 1000, (1, shape[0])),), {}
    return (torch.randn(1, *shape),), {}


@pytest.mark.parametrize("name", list_models())
def test_forward_flops_match_flop_counter(name):
    over, shape = _tiny(name)
    tower = create(name, **over).eval()
    args, kwargs = _input(name, shape)
    measured = measure_flops(lambda: tower(*args, **kwargs), tower)
    assert measured > 0
    assert forward_flops(tower, shape) == measured
    assert forward_flops(name, shape, **over) == measured  # by name, without building
    assert param_count(tower) == count_params(tower)


@pytest.mark.parametrize("name", list_models())
def test_param_count_full_size(name):
    """The real-size architecture (built on the meta device: no memory, no init cost)."""
    over = {"load_weights": False} if name == "text_minilm" else {}
    with torch.device("meta"):
        tower = create(name, **over)
    assert param_count(name) == count_params(tower)


def test_known_sizes():
    # ViT-B/16 has ~86M parameters; MAE reports ~17.6 GFLOPs (multiply-adds) at 224 px -> ~35 GFLOPs here
    assert 85e6 < param_count("vit2d_base_p16") < 87e6
    assert 34e9 < forward_flops("vit2d_base_p16") < 36e9
    assert train_flops(10) == 30


@pytest.mark.parametrize("name", ["vit2d_tiny_p16", "vit3d_tiny_p4x16", "signal_tiny"])
def test_mae_flops_match_flop_counter(name):
    over, shape = _tiny(name)
    over.pop("num_registers", None)
    tower = create(name, **over).eval()
    dec = decoder_for(tower, width=16, depth=1, num_heads=2).eval()
    x = torch.randn(1, *shape)

    def step():
        latent, _, ids = tower.forward_masked(x, 0.75)
        dec(latent, ids, grid=tower.grid_size(x))

    measured = measure_flops(step, torch.nn.ModuleList([tower, dec]))
    assert mae_forward_flops(tower, 0.75, shape, decoder_width=16, decoder_depth=1) == measured
