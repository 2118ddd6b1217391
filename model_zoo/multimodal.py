"""Multimodal composition from a typed config: towers + projection heads + MAE decoders + caption decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from medfm.model_zoo.caption import CaptionDecoder
from medfm.model_zoo.heads import ProjectionHead
from medfm.model_zoo.mae import decoder_for
from medfm.model_zoo.registry import create, get_spec
from medfm.schema import ConfigError
from medfm.schema.modalities import MODALITIES

MAE_MODALITIES = ("image", "volume", "signal")


@dataclass
class TowerSpec:
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # pretrained weights for this tower (HF dir / pkg: spec / .safetensors / zoo NAME:VERSION / medfm checkpoint),
    # applied by the training engine after the build (medfm.model_zoo.init_from), also under zero.Init
    init_from: str | None = None


@dataclass
class MAEDecoderSpec:
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class CaptionSpec:
    enabled: bool = False
    width: int = 512
    depth: int = 6
    num_heads: int = 8
    max_len: int = 128
    vocab_size: int | None = None  # None: the text tower's vocabulary (so its tokenizer can be reused)
    context: list[str] = field(default_factory=list)  # modalities it may attend to; empty = every non-text tower


@dataclass
class MultiModalConfig:
    towers: dict[str, TowerSpec] = field(default_factory=dict)  # modality -> arch (+ overrides)
    embed_dim: int = 512
    head: Literal["linear", "mlp"] = "linear"
    mae: list[str] = field(default_factory=list)  # modalities that get an MAE decoder
    mae_decoder: MAEDecoderSpec = field(default_factory=MAEDecoderSpec)
    caption: CaptionSpec = field(default_factory=CaptionSpec)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP temperature, stored as log
    init_siglip_logit_scale: float = math.log(10.0)  # SigLIP's own temperature (paper init t' = log 10)
    init_logit_bias: float = -10.0  # SigLIP bias
    attn_backend: str | None = None  # when set, overrides every tower's and decoder's attention backend
    grad_checkpointing: bool | None = None  # when set, overrides every tower's switch
    init_from: str | None = None  # pretrained weights for the whole model (see TowerSpec.init_from)

    def validate(self):
        if not self.towers:
            raise ValueError("towers: at least one modality -> {arch: ...} is required")
        for modality, spec in self.towers.items():
            if modality not in MODALITIES:
                raise ValueError(f"towers.{modality}: unknown modality (expected one of {list(MODALITIES)})")
            try:
                arch_modality = get_spec(spec.arch).modality
            except ConfigError as exc:
                raise ValueError(f"towers.{modality}.arch: {exc}") from None
            if arch_modality != modality:
                raise ValueError(f"towers.{modality}.arch: '{spec.arch}' is a {arch_modality} tower")
        for m in self.mae:
            if m not in MAE_MODALITIES:
                raise ValueError(f"mae: '{m}' has no MAE decoder (MAE modalities: {list(MAE_MODALITIES)})")
            if m not in self.towers:
                raise ValueError(f"mae: '{m}' has no tower in towers")
        if self.caption.enabled:
            ctx = self.caption.context or [m for m in self.towers if m != "text"]
            if not ctx:
                raise ValueError("caption.enabled needs a non-text tower to attend to")
            for m in ctx:
                if m not in self.towers:
                    raise ValueError(f"caption.context: '{m}' has no tower in towers")
            if self.caption.vocab_size is None and "text" not in self.towers:
                raise ValueError("caption.vocab_size is required when there is no text tower")


class MultiModalModel(nn.Module):
    """Towers by modality, projection heads into ``embed_dim``, optional MAE and caption decoders, and the
    contrastive scalars ``logit_scale`` / ``logit_bias`` (shape [1], never 0-dim)."""

    def __init__(self, cfg: MultiModalConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        towers = {}
        for modality in MODALITIES:  # canonical order -> identical parameter order on every rank
            if modality not in cfg.towers:
                continue
            spec = cfg.towers[modality]
            overrides = dict(spec.overrides)
            if cfg.attn_backend is not None and modality != "text":
                overrides["attn_backend"] = cfg.attn_backend
            if cfg.grad_checkpointing is not None:
                overrides["grad_checkpointing"] = cfg.grad_checkpointing
            towers[modality] = create(spec.arch, **overrides)
        self.towers = nn.ModuleDict(towers)
        self.heads = nn.ModuleDict(
            {m: ProjectionHead(t.width, cfg.embed_dim, cfg.head) for m, t in self.towers.items()}
        )
        d = cfg.mae_decoder
        backend = cfg.attn_backend or "auto"
        self.mae_decoders = nn.ModuleDict(
            {m: decoder_for(self.towers[m], d.width, d.depth, d.num_heads, d.mlp_ratio, backend)
             for m in MODALITIES if m in cfg.mae}
        )
        self.caption_decoder = None
        if cfg.caption.enabled:
            c = cfg.caption
            ctx = c.context or [m for m in self.towers if m != "text"]
            vocab = c.vocab_size or self.towers["text"].hf_config.vocab_size
            self.caption_decoder = CaptionDecoder(
                vocab, {m: self.towers[m].width for m in ctx}, c.width, c.depth, c.num_heads, c.max_len,
                attn_backend=backend,
            )
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        # SigLIP pairs get their own temperature: sharing CLIP's (init 1/0.07) with a -10 bias starts SigLIP at
        # logits of ~4 with a sigmoid scale tuned for 10, which collapses near-duplicate captions to the trivial
        # "every pair scores the same" solution (seen on the demo ECG captions).
        self.siglip_logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_siglip_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.towers.keys())

    def _tower(self, modality: str):
        if modality not in self.towers:
            raise KeyError(f"model has no '{modality}' tower (has {list(self.towers)})")
        return self.towers[modality]

    def encode(self, modality: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens [B, N, width] and the pooled feature [B, width] of one modality of a loader batch."""
        tower = self._tower(modality)
        x, masks = tower.batch_inputs(batch)
        tokens = tower(x, **masks)
        return tokens, tower.pool(tokens, **masks)

    def embed(self, modality: str, batch: dict) -> torch.Tensor:
        """L2-normalised embedding [B, embed_dim] in the shared space."""
        _, pooled = self.encode(modality, batch)
        return F.normalize(self.heads[modality](pooled), dim=-1)

    def mae(self, modality: str, batch: dict, mask_ratio: float = 0.75, generator: torch.Generator | None = None):
        """One MAE forward: {'pred', 'target' (raw patches), 'mask' (1=removed), 'valid' (bool [B,N] or None)}."""
        if modality not in self.mae_decoders:
            raise KeyError(f"model has no MAE decoder for '{modality}' (has {list(self.mae_decoders)})")
        tower = self.towers[modality]
        x, masks = tower.batch_inputs(batch)
        latent, mask, ids_restore = tower.forward_masked(x, mask_ratio, generator, **masks)
        valid = tower.token_valid(x, **masks)
        pred = self.mae_decoders[modality](latent, ids_restore, grid=tower.grid_size(x), valid=valid)
        target = tower.patchify(x, masks.get("signal_valid")) if modality == "signal" else tower.patchify(x)
        return {"pred": pred, "target": target, "mask": mask, "valid": valid}

    def caption_logits(self, modality: str, batch: dict, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, T, V] of ``batch['text_ids']`` given the ``modality`` tower's tokens."""
        if self.caption_decoder is None:
            raise RuntimeError("caption decoder is disabled (caption.enabled=false)")
        tower = self._tower(modality)
        x, masks = tower.batch_inputs(batch)
        if tokens is None:
            tokens = tower(x, **masks)
        valid = tower.token_valid(x, **masks)
        ctx_mask = None
        if valid is not None:
            b, p = valid.shape[0], tower.num_prefix_tokens
            ctx_mask = torch.cat([torch.ones(b, p, dtype=torch.bool, device=valid.device), valid], dim=1)
        return self.caption_decoder(batch["text_ids"], tokens, modality, ctx_mask)


def build_multimodal(cfg: MultiModalConfig | dict) -> MultiModalModel:
    """Build from a MultiModalConfig or its dict form (validated; a bad field raises ConfigError naming it)."""
    if isinstance(cfg, dict):
        from medfm.schema import from_dict

        cfg = from_dict(MultiModalConfig, cfg)
    return MultiModalModel(cfg)


def tiny_config(
    modalities=("image", "volume", "signal", "ehr", "text"),
    embed_dim: int = 32,
    image_size: int = 32,
    image_chans: int = 1,
    volume_size: tuple[int, int, int] = (16, 32, 32),
    n_leads: int = 12,
    signal_len: int = 500,
    ehr_vocab: int = 64,
    mae: bool = True,
    caption: bool = True,
) -> MultiModalConfig:
    """A CPU-sized model of real architecture (2-layer towers, 64-wide decoders) for tests, smoke runs and the demo."""
    small = {"width": 64, "depth": 2, "num_heads": 4}
    specs = {
        "image": TowerSpec("vit2d_tiny_p16", {**small, "img_size": image_size, "in_chans": image_chans}),
        "volume": TowerSpec("vit3d_tiny", {**small, "img_size": list(volume_size), "patch_size": [4, 16, 16]}),
        "signal": TowerSpec("signal_tiny", {**small, "n_leads": n_leads, "patch_size": 50, "max_len": signal_len}),
        "ehr": TowerSpec("ehr_tiny", {**small, "vocab_size": ehr_vocab}),
        "text": TowerSpec("text_bert_tiny", {"width": 64, "depth": 2, "num_heads": 4, "intermediate_size": 128}),
    }
    unknown = [m for m in modalities if m not in specs]
    if unknown:
        raise ValueError(f"tiny_config: unknown modalities {unknown}")
    towers = {m: specs[m] for m in modalities}
    mae_mods = [m for m in MAE_MODALITIES if m in towers] if mae else []
    has_ctx = any(m != "text" for m in towers)
    return MultiModalConfig(
        towers=towers,
        embed_dim=embed_dim,
        mae=mae_mods,
        mae_decoder=MAEDecoderSpec(width=64, depth=1, num_heads=4),
        caption=CaptionSpec(enabled=caption and has_ctx and "text" in towers, width=64, depth=1, num_heads=4,
                            max_len=64),
    )
