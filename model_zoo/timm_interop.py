"""Key mapping between the 2D ViT tower and timm's ``VisionTransformer``, so users fine-tune with timm.

Our block parameter names already follow timm (norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
ls2.gamma), so the mapping is: same names for blocks / patch_embed / cls_token / reg_token / norm, plus the position
table, which timm stores as a learned ``pos_embed`` [1, N, D] for patch tokens only when ``no_embed_class=True``
(our layout: prefix tokens carry no position). A fixed sin-cos table is materialised into it.

    kwargs = timm_kwargs(vit); sd = to_timm_state_dict(vit)
    model = timm.models.vision_transformer.VisionTransformer(**kwargs); model.load_state_dict(sd)
"""

from __future__ import annotations

import torch

from medfm.model_zoo.vit2d import ViT2D


def timm_kwargs(vit: ViT2D) -> dict:
    """Constructor kwargs of timm's VisionTransformer with the same architecture (headless: num_classes=0)."""
    c = vit.cfg
    return {
        "img_size": c.img_size,
        "patch_size": c.patch_size,
        "in_chans": c.in_chans,
        "embed_dim": c.width,
        "depth": c.depth,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio,
        "qkv_bias": c.qkv_bias,
        "class_token": c.class_token,
        "reg_tokens": c.num_registers,
        "no_embed_class": True,
        "global_pool": "token" if c.pool == "cls" else "avg",
        "fc_norm": False,  # our tokens are normed before pooling (timm's default for 'avg' norms after)
        "init_values": c.layer_scale,
        "num_classes": 0,
    }


def to_timm_state_dict(vit: ViT2D) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in vit.state_dict().items():
        out[name] = t.detach().clone()
    if "pos_embed" not in out:  # fixed sin-cos buffer (non-persistent) -> timm's learned table
        out["pos_embed"] = vit.pos_embed.detach().clone()
    return out


def from_timm_state_dict(vit: ViT2D, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm VisionTransformer weights (headless) -> our state dict; fails naming any tensor it cannot place."""
    ours = vit.state_dict()
    out = {}
    for name, t in state.items():
        if name.startswith(("head.", "fc_norm.", "attn_pool.")):
            raise KeyError(f"timm tensor '{name}' has no counterpart in the tower: export the timm model headless "
                           "(num_classes=0, fc_norm=False, global_pool 'token' or 'avg')")
        if name == "pos_embed" and "pos_embed" not in ours:
            if not torch.allclose(t, vit.pos_embed.to(t.dtype), atol=1e-6):
                raise ValueError("timm pos_embed was trained; build the tower with pos_embed='learned' to keep it")
            continue
        if name not in ours:
            raise KeyError(f"timm tensor '{name}' has no counterpart in the {vit.modality} tower")
        if tuple(t.shape) != tuple(ours[name].shape):
            raise ValueError(f"timm tensor '{name}' has shape {list(t.shape)}, tower expects {list(ours[name].shape)}")
        out[name] = t
    missing = sorted(set(ours) - set(out))
    if missing:
        raise KeyError(f"tower tensor '{missing[0]}' is missing from the timm state dict")
    return out
