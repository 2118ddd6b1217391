"""Peer side of the timm interop test (runs in .venv-peers, where timm imports beside torchvision).

Builds timm's own VisionTransformer from the kwargs medfm exported, loads medfm's mapped weights with strict=True,
and writes timm's pooled output for the given input, so the medfm side can compare it with its own tower.
Usage: timm_vit.py IN_DIR OUT_FILE  (IN_DIR holds kwargs.json and tensors.safetensors: weights + "__input__").
"""

import json
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer


def main(in_dir: str, out_file: str) -> None:
    src = Path(in_dir)
    kwargs = json.loads((src / "kwargs.json").read_text())
    tensors = load_file(str(src / "tensors.safetensors"))
    x = tensors.pop("__input__")
    model = VisionTransformer(**kwargs).eval()
    model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        out = model(x)
    save_file({"pooled": out.contiguous()}, out_file, metadata={"timm": timm.__version__})
    print(f"timm {timm.__version__}: {tuple(out.shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
