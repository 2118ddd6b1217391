"""2D ViT <-> timm VisionTransformer key mapping.

timm cannot be imported beside torch 2.13.0 here (it needs torchvision; torchvision 0.28.0 fails with
"operator torchvision::nms does not exist"), so the key names, shapes and constructor kwargs are checked against a
fixture captured from real timm 1.0.31 code (benchmarks/model_zoo_capture_timm_keys.py; outputs matched exactly,
max |diff| recorded in the fixture), and live: the peer environment (.venv-peers, `make peers`, where timm imports
beside torchvision) builds timm's VisionTransformer, loads the mapped weights strictly and must give our outputs.
"""

import json
from pathlib import Path

import pytest
import torch
from peers.parity_env import PEERS_DIR, peer_python, run_script
from safetensors.torch import load_file, save_file

from medfm.model_zoo import create
from medfm.model_zoo.timm_interop import from_timm_state_dict, timm_kwargs, to_timm_state_dict

FIXTURE = json.loads((Path(__file__).parent / "data" / "model_zoo_timm_vit_keys.json").read_text())
CASES = FIXTURE["cases"]


def _vit(over):
    torch.manual_seed(0)
    return create("vit2d_tiny_p16", img_size=32, width=64, depth=2, num_heads=4, **over).eval()


@pytest.mark.parametrize("case", CASES, ids=[str(c["overrides"]) for c in CASES])
def test_mapping_matches_timm_key_names_and_shapes(case):
    vit = _vit(case["overrides"])
    sd = to_timm_state_dict(vit)
    assert {k: list(v.shape) for k, v in sd.items()} == case["timm_keys"]
    kw = timm_kwargs(vit)
    assert json.loads(json.dumps(kw)) == case["timm_kwargs"]
    assert case["max_abs_diff_pooled"] == 0.0 and case["max_abs_diff_tokens"] == 0.0
    back = from_timm_state_dict(vit, sd)  # and back again
    vit.load_state_dict(back, strict=True)


def test_unmappable_timm_tensors_are_named():
    vit = _vit({"pool": "cls"})
    sd = to_timm_state_dict(vit)
    with pytest.raises(KeyError, match="head.weight"):
        from_timm_state_dict(vit, {**sd, "head.weight": torch.zeros(10, 64)})
    sd.pop("blocks.1.mlp.fc2.bias")
    with pytest.raises(KeyError, match="blocks.1.mlp.fc2.bias"):
        from_timm_state_dict(vit, sd)


@pytest.mark.parametrize("case", CASES, ids=[str(c["overrides"]) for c in CASES])
def test_live_timm_outputs_match(case, tmp_path):
    """Real timm (in the peer environment, where it imports beside torchvision) loads the mapped weights strictly
    and computes the same pooled output as medfm's tower."""
    vit = _vit(case["overrides"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (tmp_path / "kwargs.json").write_text(json.dumps(timm_kwargs(vit)))
    tensors = {k: v.contiguous() for k, v in to_timm_state_dict(vit).items()}
    save_file({**tensors, "__input__": x}, str(tmp_path / "tensors.safetensors"))
    out = tmp_path / "timm_out.safetensors"
    run_script(peer_python(), PEERS_DIR / "timm_vit.py", [tmp_path, out], timeout=180)
    with torch.no_grad():
        ours = vit.pool(vit(x))
    torch.testing.assert_close(load_file(str(out))["pooled"], ours, rtol=1e-5, atol=1e-5)
