"""Named architectures per modality and size: ``create(name, **overrides)``, ``list_models()``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from medfm.model_zoo.ehr import EHRConfig, EHRTransformer
from medfm.model_zoo.signal import SignalConfig, SignalTransformer
from medfm.model_zoo.text import MINILM, TextConfig, TextTower
from medfm.model_zoo.tower import Tower
from medfm.model_zoo.vit2d import ViT2D, ViT2DConfig
from medfm.model_zoo.vit3d import ViT3D, ViT3DConfig
from medfm.schema import ConfigError, from_dict


@dataclass
class ModelSpec:
    name: str
    tower_cls: type
    config_cls: type
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return self.tower_cls.modality


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, tower_cls: type, config_cls: type, **defaults) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is already registered")
    from_dict(config_cls, defaults, name)  # fail at import time on a bad default
    _REGISTRY[name] = ModelSpec(name, tower_cls, config_cls, defaults)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        raise ConfigError(f"unknown model '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                          + "; see medfm.model_zoo.list_models()")
    return _REGISTRY[name]


def list_models(modality: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if modality is None or s.modality == modality)


def model_config(name: str, **overrides):
    """The typed config of ``name`` with ``overrides`` applied (validated; bad keys raise ConfigError)."""
    spec = get_spec(name)
    return from_dict(spec.config_cls, {**spec.defaults, **overrides}, name)


def create(name: str, **overrides) -> Tower:
    """Build the tower ``name`` (see list_models()) with config field overrides, e.g. create('vit2d_tiny_p16', depth=2)."""
    spec = get_spec(name)
    cfg = model_config(name, **overrides)
    tower = spec.tower_cls(cfg)
    tower.arch = name
    return tower


# -- the catalogue ------------------------------------------------------------------------------------------------
_VIT_SIZES = {  # width, depth, heads (ViT paper / DeiT / MAE)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
for _size, (_w, _d, _h) in _VIT_SIZES.items():
    for _p in (14, 16):
        register(f"vit2d_{_size}_p{_p}", ViT2D, ViT2DConfig, img_size=224, patch_size=_p, width=_w, depth=_d,
                 num_heads=_h)
    if _size != "huge":
        register(f"vit3d_{_size}", ViT3D, ViT3DConfig, img_size=(96, 96, 96), patch_size=(16, 16, 16), width=_w,
                 depth=_d, num_heads=_h)
        # anisotropic CT: thick slices, fine in-plane
        register(f"vit3d_{_size}_p4x16", ViT3D, ViT3DConfig, img_size=(32, 192, 192), patch_size=(4, 16, 16),
                 width=_w, depth=_d, num_heads=_h)

for _size, (_w, _d, _h) in {"tiny": (192, 6, 3), "small": (384, 12, 6), "base": (768, 12, 12)}.items():
    register(f"signal_{_size}", SignalTransformer, SignalConfig, width=_w, depth=_d, num_heads=_h)
    register(f"ehr_{_size}", EHRTransformer, EHRConfig, width=_w, depth=_d, num_heads=_h)

register("text_minilm", TextTower, TextConfig, path=MINILM, tokenizer=MINILM)
for _size, (_w, _d, _h) in {"tiny": (128, 2, 2), "small": (512, 4, 8), "base": (768, 12, 12)}.items():
    register(f"text_bert_{_size}", TextTower, TextConfig, width=_w, depth=_d, num_heads=_h, intermediate_size=4 * _w)
