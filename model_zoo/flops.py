"""Analytic parameter counts and forward FLOPs per sample, for MFU logging and scaling-law studies.

Conventions match ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs; matmuls, convolutions and
attention (QK^T and AV, dense, ignoring causal/padding sparsity) are counted; norms, softmax, activations, embeddings
lookups and bias adds are not. Training FLOPs are ~3x forward (``train_flops``). ``measure_flops`` runs the counter
on a real module (attention routed through matmuls so CPU SDPA is counted too); the tests check both agree exactly.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from medfm.model_zoo.ehr import EHRConfig
from medfm.model_zoo.registry import get_spec, model_config
from medfm.model_zoo.signal import SignalConfig
from medfm.model_zoo.text import TextConfig
from medfm.model_zoo.vit2d import ViT2DConfig
from medfm.model_zoo.vit3d import ViT3DConfig

EHR_DEFAULT_EVENTS = 256


def block_flops(n: int, d: int, hidden: int, context: int = 0) -> int:
    """One pre-norm block on n tokens of width d (MLP hidden size ``hidden``), plus cross-attention to
    ``context`` tokens of width d when context > 0."""
    f = 8 * n * d * d + 4 * n * n * d + 4 * n * d * hidden
    if context:
        f += 4 * n * d * d + 4 * context * d * d + 4 * n * context * d
    return f


def block_params(d: int, hidden: int, cross: bool = False, layer_scale: bool = False) -> int:
    p = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    if cross:
        p += 2 * d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d)
    if layer_scale:
        p += d * (3 if cross else 2)
    return p


def _cfg_of(model_or_name, overrides):
    if isinstance(model_or_name, str):
        return model_config(model_or_name, **overrides), get_spec(model_or_name).modality
    cfg = getattr(model_or_name, "cfg", None)
    if cfg is None:
        raise TypeError(f"expected a tower or a registered model name, got {type(model_or_name).__name__}")
    return cfg, model_or_name.modality


def _hf_dims(cfg: TextConfig):
    """(vocab, width, depth, intermediate, max_positions, type_vocab) of a text tower config."""
    if cfg.path is not None:
        from transformers import AutoConfig

        from medfm.model_zoo.text import resolve_local_dir

        h = AutoConfig.from_pretrained(resolve_local_dir(cfg.path))
        return (h.vocab_size, h.hidden_size, h.num_hidden_layers, h.intermediate_size, h.max_position_embeddings,
                getattr(h, "type_vocab_size", 2))
    return cfg.vocab_size, cfg.width, cfg.depth, cfg.intermediate_size, cfg.max_position_embeddings, 2


def default_input_shape(cfg) -> tuple[int, ...]:
    if isinstance(cfg, ViT2DConfig):
        return (cfg.in_chans, cfg.img_size, cfg.img_size)
    if isinstance(cfg, ViT3DConfig):
        return (cfg.in_chans, *cfg.img_size)
    if isinstance(cfg, SignalConfig):
        return (cfg.n_leads, cfg.max_len)
    if isinstance(cfg, EHRConfig):
        return (EHR_DEFAULT_EVENTS,)
    if isinstance(cfg, TextConfig):
        return (cfg.max_length,)
    raise TypeError(f"no default input shape for {type(cfg).__name__}")


def num_tokens(cfg, input_shape) -> tuple[int, int]:
    """(patch/event tokens, prefix tokens) the tower sees for one sample of ``input_shape``."""
    if isinstance(cfg, ViT2DConfig):
        return (input_shape[1] // cfg.patch_size) * (input_shape[2] // cfg.patch_size), int(cfg.class_token) + \
            cfg.num_registers
    if isinstance(cfg, ViT3DConfig):
        return math.prod(s // p for s, p in zip(input_shape[1:], cfg.patch_size)), 1
    if isinstance(cfg, SignalConfig):
        return -(-input_shape[1] // cfg.patch_size), 1
    if isinstance(cfg, EHRConfig):
        return input_shape[0], 1
    if isinstance(cfg, TextConfig):
        return input_shape[0], 0
    raise TypeError(f"unknown tower config {type(cfg).__name__}")


def _patch_in(cfg) -> int:
    if isinstance(cfg, ViT2DConfig):
        return cfg.in_chans * cfg.patch_size**2
    if isinstance(cfg, ViT3DConfig):
        return cfg.in_chans * math.prod(cfg.patch_size)
    if isinstance(cfg, SignalConfig):
        return cfg.n_leads * cfg.patch_size
    return 0


def _encoder_flops(cfg, n_patch: int, n_prefix: int) -> int:
    """Tower FLOPs when n_patch tokens enter the blocks (n_patch < all patches for MAE's visible subset)."""
    if isinstance(cfg, TextConfig):
        _, d, depth, inter, _, _ = _hf_dims(cfg)
        return depth * block_flops(n_patch, d, inter)
    d = cfg.width
    hidden = int(d * cfg.mlp_ratio)
    if isinstance(cfg, EHRConfig):
        embed = 2 * n_patch * cfg.time_features * d + 2 * n_patch * d  # time + value projections
    else:
        embed = 0  # patch embedding is counted by the caller (it runs on every patch, masked or not)
    return embed + cfg.depth * block_flops(n_patch + n_prefix, d, hidden)


def forward_flops(model_or_name, input_shape: tuple[int, ...] | None = None, **overrides) -> int:
    """Forward FLOPs for ONE sample of ``input_shape`` (per-sample shape, no batch dim; default: the config's
    native size — image (C,H,W), volume (C,D,H,W), signal (leads, samples), ehr (events,), text (tokens,))."""
    cfg, _ = _cfg_of(model_or_name, overrides)
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(cfg)
    n, prefix = num_tokens(cfg, shape)
    patch = 2 * n * _patch_in(cfg) * getattr(cfg, "width", 0)
    return patch + _encoder_flops(cfg, n, prefix)


def mae_forward_flops(model_or_name, mask_ratio: float = 0.75, input_shape=None, decoder_width: int = 512,
                      decoder_depth: int = 8, decoder_mlp_ratio: float = 4.0, **overrides) -> int:
    """Forward FLOPs of one MAE step for one sample: patch embed on all patches, encoder on the visible ones,
    decoder on all (MAEDecoder as built by ``mae.decoder_for``)."""
    cfg, _ = _cfg_of(model_or_name, overrides)
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(cfg)
    n, prefix = num_tokens(cfg, shape)
    keep = max(1, int(n * (1.0 - mask_ratio)))
    pin, d, dw = _patch_in(cfg), cfg.width, decoder_width
    enc = 2 * n * pin * d + _encoder_flops(cfg, keep, prefix)
    dec = 2 * (prefix + keep) * d * dw + decoder_depth * block_flops(prefix + n, dw, int(dw * decoder_mlp_ratio))
    dec += 2 * (prefix + n) * dw * pin
    if isinstance(cfg, SignalConfig):  # 1-D decoders mix each grid token with its neighbours: depthwise conv, kernel 3
        from medfm.model_zoo.mae import MAEDecoder1D

        dec += 2 * n * dw * MAEDecoder1D.local_kernel
    return enc + dec


def train_flops(forward: int) -> int:
    """Forward + backward ~ 3x forward (backward computes grads w.r.t. both inputs and weights)."""
    return 3 * forward


def param_count(model_or_name, **overrides) -> int:
    """Analytic number of parameters of a tower (weights that are trained; fixed sin-cos tables excluded)."""
    cfg, _ = _cfg_of(model_or_name, overrides)
    if isinstance(cfg, TextConfig):
        vocab, d, depth, inter, maxpos, types = _hf_dims(cfg)
        embed = (vocab + maxpos + types) * d + 2 * d
        layer = 4 * (d * d + d) + 4 * d + (d * inter + inter) + (inter * d + d)
        return embed + depth * layer
    d = cfg.width
    blocks = cfg.depth * block_params(d, int(d * cfg.mlp_ratio), layer_scale=bool(cfg.layer_scale))
    final = 2 * d
    if isinstance(cfg, EHRConfig):
        return cfg.vocab_size * d + (cfg.time_features * d + d) + (d + d) + d + d + blocks + final
    patch = _patch_in(cfg) * d + d
    if isinstance(cfg, ViT2DConfig):
        n = (cfg.img_size // cfg.patch_size) ** 2
        prefix = (d if cfg.class_token else 0) + cfg.num_registers * d
        pos = n * d if cfg.pos_embed == "learned" else 0
        return patch + prefix + pos + blocks + final
    if isinstance(cfg, ViT3DConfig):
        n = math.prod(s // p for s, p in zip(cfg.img_size, cfg.patch_size))
        pos = n * d if cfg.pos_embed == "learned" else 0
        return patch + d + pos + blocks + final
    if isinstance(cfg, SignalConfig):
        return patch + cfg.n_leads * d + d + blocks + final
    raise TypeError(f"unknown tower config {type(cfg).__name__}")


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of a built module (tied weights counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@contextlib.contextmanager
def countable_attention(module: nn.Module):
    """Route every attention through explicit matmuls (our 'math' backend, HF 'eager') so FlopCounterMode sees it;
    CPU SDPA kernels are not counted by torch's flop counter."""
    from medfm.model_zoo.attention import Attention

    saved = []
    for m in module.modules():
        if isinstance(m, Attention):
            saved.append((m, "backend", m.backend))
            m.backend = "math"
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and isinstance(m, nn.Module) and \
                hasattr(m, "set_attn_implementation"):
            saved.append((m, "attn", cfg._attn_implementation))
            m.set_attn_implementation("eager")
    try:
        yield module
    finally:
        for m, kind, value in reversed(saved):
            if kind == "backend":
                m.backend = value
            else:
                m.set_attn_implementation(value)


def measure_flops(fn, module: nn.Module | None = None) -> int:
    """FLOPs that torch's FlopCounterMode records while calling ``fn()`` (attention made countable in ``module``)."""
    from torch.utils.flop_counter import FlopCounterMode

    ctx = countable_attention(module) if module is not None else contextlib.nullcontext()
    with ctx, FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def caption_decoder_flops(decoder: nn.Module, text_tokens: int, context_tokens: int, context_width: int) -> int:
    """Forward FLOPs of one sample through a CoCa ``CaptionDecoder``: the context projection into its width, causal
    self-attention blocks with cross-attention to the ``context_tokens`` (counted dense, as everywhere here), and
    the next-token head."""
    w, t, m = decoder.width, text_tokens, context_tokens
    hidden = decoder.blocks[0].mlp.fc1.out_features if len(decoder.blocks) else 0
    blocks = len(decoder.blocks) * block_flops(t, w, hidden, context=m)
    return 2 * m * context_width * w + blocks + 2 * t * w * decoder.vocab_size
