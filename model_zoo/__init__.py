"""medfm.model_zoo: towers for every modality, attention backends, decoders, registry, FLOPs, release format.

    from medfm.model_zoo import create, list_models, build_multimodal, MultiModalConfig, load
"""

from medfm.model_zoo.attention import Attention, attention, available_backends
from medfm.model_zoo.multimodal import (
    CaptionSpec,
    MAEDecoderSpec,
    MultiModalConfig,
    MultiModalModel,
    TowerSpec,
    build_multimodal,
    tiny_config,
)
from medfm.model_zoo.registry import create, list_models, model_config


def load(path_or_name, zoo=None, map_location="cpu", verify=True):
    """Rebuild a released model from a release directory or a zoo ``name[:version]`` (see release.py)."""
    from medfm.model_zoo.release import load as _load

    return _load(path_or_name, zoo=zoo, map_location=map_location, verify=verify)


__all__ = [
    "Attention",
    "CaptionSpec",
    "MAEDecoderSpec",
    "MultiModalConfig",
    "MultiModalModel",
    "TowerSpec",
    "attention",
    "available_backends",
    "build_multimodal",
    "create",
    "list_models",
    "load",
    "model_config",
    "tiny_config",
]
