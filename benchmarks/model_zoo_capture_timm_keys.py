"""Regenerate tests/data/model_zoo_timm_vit_keys.json from real timm code.

Usage: unzip a timm wheel into DIR, then `python benchmarks/model_zoo_capture_timm_keys.py DIR`.
Why: timm needs torchvision, and no torchvision build imports beside this torch (2.13.0 CPU): torchvision 0.28.0
fails with "operator torchvision::nms does not exist". VisionTransformer itself never calls torchvision, so the
import is stubbed here, the tower's weights are loaded into timm's model, and outputs are compared exactly.
"""

import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from unittest import mock


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: mock.MagicMock(name=f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


def main(timm_dir: str) -> None:
    sys.meta_path.insert(0, _StubTorchvision())
    sys.path.insert(0, timm_dir)
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from medfm.model_zoo import create
    from medfm.model_zoo.timm_interop import from_timm_state_dict, timm_kwargs, to_timm_state_dict

    res = {"timm_version": timm.__version__, "cases": []}
    cases = [{"pool": "cls"}, {"pool": "gap", "num_registers": 2, "layer_scale": 0.1},
             {"pool": "cls", "pos_embed": "learned", "num_registers": 1}]
    for over in cases:
        torch.manual_seed(0)
        vit = create("vit2d_tiny_p16", img_size=32, width=64, depth=2, num_heads=4, **over).eval()
        kw = timm_kwargs(vit)
        tm = VisionTransformer(**kw).eval()
        tm.load_state_dict(to_timm_state_dict(vit), strict=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            pooled = (vit.pool(vit(x)) - tm(x)).abs().max().item()
            tokens = (vit(x) - tm.forward_features(x)).abs().max().item()
        vit.load_state_dict(from_timm_state_dict(vit, tm.state_dict()), strict=True)
        res["cases"].append({"overrides": over, "timm_kwargs": kw, "max_abs_diff_pooled": pooled,
                             "max_abs_diff_tokens": tokens,
                             "timm_keys": {k: list(v.shape) for k, v in tm.state_dict().items()}})
        print(over, pooled, tokens)
    out = Path(__file__).resolve().parents[1] / "tests" / "data" / "model_zoo_timm_vit_keys.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/timmtest")
