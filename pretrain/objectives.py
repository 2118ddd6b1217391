"""Pretraining objectives named in the run config, each a small nn.Module over the model_zoo towers.

Names (the same strings the loader's step-plan groups list):
- ``mae:<image|volume|signal>``        masked autoencoding, loss on removed patches only
- ``contrastive:<a>-<b>``              CLIP (``loss: clip``) or SigLIP (``loss: siglip``) between two modalities
- ``caption:<modality>``               the model's causal text decoder on that modality's tokens (CoCa generative half)
- ``lm:<modality>``                    a transformers causal LM from a local directory, tower tokens projected into its
                                       embedding space as a prefix (LLaVA / RadFM style)

Every objective returns ``{name: loss}``; ``total = sum(weight * loss)`` is formed by the step. Embeddings are
computed once per modality per step through a ``StepCache`` so several pairs that share an anchor (ImageBind) run the
tower once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medfm.model_zoo.multimodal import MAE_MODALITIES
from medfm.pretrain.losses import ClipLoss, SigLipLoss, caption_loss, mae_loss
from medfm.schema.modalities import MODALITIES

KINDS = ("mae", "contrastive", "caption", "lm")
# MAE paper defaults: 0.75 for 2D; volumes are more redundant (VideoMAE / MAE-3D use 0.75-0.9); signals ~0.5.
DEFAULT_MASK_RATIO = {"image": 0.75, "volume": 0.85, "signal": 0.5}


@dataclass
class ObjectiveConfig:
    """One objective: ``name`` (see module docstring), its weight in the total, and kind-specific options."""

    name: str
    weight: float = 1.0
    loss: Literal["clip", "siglip"] = "clip"  # contrastive only
    local_loss: bool = True  # contrastive clip: B x (W*B) logits (linear memory) instead of (W*B)^2
    gather_with_grad: bool = True
    mask_ratio: float | None = None  # mae; None = the per-modality default
    norm_pix: bool = True  # mae: per-patch normalised pixel targets
    label_smoothing: float = 0.0  # caption / lm
    lm_path: str = ""  # lm: local transformers directory (config + weights); nothing is downloaded
    projector: Literal["linear", "mlp"] = "mlp"  # lm: tower width -> LM hidden size

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the objective reads, canonical order (caption/lm also read text)."""
        arg = self.name.split(":", 1)[1] if ":" in self.name else ""
        mods = set(arg.split("-")) if self.kind == "contrastive" else {arg}
        if self.kind in ("caption", "lm"):
            mods.add("text")
        return tuple(m for m in MODALITIES if m in mods)

    def validate(self):
        if ":" not in self.name:
            raise ValueError(f"objective name {self.name!r}: expected '<kind>:<modality>' with kind in {list(KINDS)}")
        kind, arg = self.name.split(":", 1)
        if kind not in KINDS:
            raise ValueError(f"objective {self.name!r}: unknown kind {kind!r} (expected one of {list(KINDS)})")
        if kind == "contrastive":
            parts = arg.split("-")
            if len(parts) != 2 or parts[0] == parts[1] or any(p not in MODALITIES for p in parts):
                raise ValueError(f"objective {self.name!r}: expected 'contrastive:<a>-<b>', two different modalities "
                                 f"from {list(MODALITIES)}")
        elif kind == "mae" and arg not in MAE_MODALITIES:
            raise ValueError(f"objective {self.name!r}: MAE needs one of {list(MAE_MODALITIES)}")
        elif kind in ("caption", "lm") and (arg not in MODALITIES or arg == "text"):
            raise ValueError(f"objective {self.name!r}: conditions on a non-text modality from {list(MODALITIES)}")
        if not self.weight >= 0:
            raise ValueError(f"objective {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"objective {self.name!r}: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if kind == "contrastive" and self.local_loss and not self.gather_with_grad:
            raise ValueError(f"objective {self.name!r}: local_loss needs gather_with_grad=true")
        if kind == "lm":
            if not self.lm_path:
                raise ValueError(f"objective {self.name!r}: lm_path (a local transformers directory) is required")
            if not os.path.isfile(os.path.join(self.lm_path, "config.json")):
                raise ValueError(f"objective {self.name!r}: lm_path {self.lm_path!r} has no config.json")


def present(batch: dict, modality: str) -> torch.Tensor:
    """Bool [B]: which samples really hold ``modality`` (all, if the loader gave no mask)."""
    key = f"{modality}_present"
    if key in batch:
        return batch[key].bool()
    first = batch[INPUT_KEY[modality]]
    return torch.ones(first.shape[0], dtype=torch.bool, device=first.device)


INPUT_KEY = {"image": "image", "volume": "volume", "signal": "signal", "ehr": "ehr_codes", "text": "text_ids"}


class StepCache:
    """Per-step memo of tower outputs, so each tower's full forward runs once per step whatever the pairs.

    Also counts the tokens each tower processed (for tokens/s).
    """

    def __init__(self, model, batch: dict):
        self.model = model
        self.batch = batch
        self._encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._embedded: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def encode(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        if modality not in self._encoded:
            tokens, pooled = self.model.encode(modality, self.batch)
            self._encoded[modality] = (tokens, pooled)
            self.count(modality, tokens)
        return self._encoded[modality]

    def embed(self, modality: str) -> torch.Tensor:
        if modality not in self._embedded:
            _, pooled = self.encode(modality)
            emb = self.model.heads[modality](pooled)
            self._embedded[modality] = nn.functional.normalize(emb, dim=-1)
        return self._embedded[modality]

    def count(self, modality: str, tokens: torch.Tensor) -> None:
        self.add_tokens(modality, int(tokens.shape[0] * tokens.shape[1]))

    def add_tokens(self, modality: str, n: int) -> None:
        self.tokens[modality] = self.tokens.get(modality, 0) + n


class Objective(nn.Module):
    def __init__(self, cfg: ObjectiveConfig):
        super().__init__()
        self.cfg = cfg
        self.name = cfg.name
        self.weight = cfg.weight
        self.modalities = cfg.modalities

    def forward(self, model, batch: dict, cache: StepCache) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class MAEObjective(Objective):
    """Masked autoencoding on one modality: encoder sees the kept patches, the decoder predicts the removed ones."""

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.modality = cfg.name.split(":", 1)[1]
        self.mask_ratio = cfg.mask_ratio if cfg.mask_ratio is not None else DEFAULT_MASK_RATIO[self.modality]

    def forward(self, model, batch, cache):
        out = model.mae(self.modality, batch, mask_ratio=self.mask_ratio)
        b, n = out["mask"].shape
        cache.add_tokens(self.modality, b * max(1, int(n * (1.0 - self.mask_ratio))))  # the encoder sees kept ones
        mask, valid = out["mask"], out["valid"]
        weight = mask if valid is None else mask * valid.to(mask.dtype)  # padded signal patches are never targets
        loss = mae_loss(out["pred"], out["target"], weight, norm_pix=self.cfg.norm_pix,
                        present=present(batch, self.modality))
        return {self.name: loss}


class ContrastiveObjective(Objective):
    """CLIP / SigLIP between two modalities; samples lacking either side are masked out of rows and columns."""

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.a, self.b = cfg.name.split(":", 1)[1].split("-")
        if cfg.loss == "clip":
            self.loss = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad)
        else:
            self.loss = SigLipLoss()

    def forward(self, model, batch, cache):
        ea, eb = cache.embed(self.a), cache.embed(self.b)
        valid = present(batch, self.a) & present(batch, self.b)
        if self.cfg.loss == "clip":
            loss = self.loss(ea, eb, model.logit_scale, valid=valid)
        else:
            loss = self.loss(ea, eb, model.siglip_logit_scale, model.logit_bias, valid=valid)
        return {self.name: loss}


def _teacher_forcing(batch: dict):
    """(targets [B,T-1], target valid [B,T-1]): token t+1 is predicted from tokens <= t."""
    ids = batch["text_ids"]
    valid = batch.get("text_valid")
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    valid = valid & present(batch, "text")[:, None]
    return ids[:, 1:], valid[:, 1:]


class CaptionObjective(Objective):
    """Report generation / captioning: the model's causal text decoder cross-attends to a tower's tokens
    (teacher forcing); together with ``contrastive:<m>-text`` this is CoCa."""

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.modality = cfg.name.split(":", 1)[1]

    def forward(self, model, batch, cache):
        tokens, _ = cache.encode(self.modality)
        logits = model.caption_logits(self.modality, batch, tokens)  # position t predicts token t+1
        targets, target_valid = _teacher_forcing(batch)
        target_valid = target_valid & present(batch, self.modality)[:, None]
        loss = caption_loss(logits[:, :-1], targets, target_valid, label_smoothing=self.cfg.label_smoothing)
        cache.count("text", batch["text_ids"])
        return {self.name: loss}


def cache_token_valid(model, modality: str, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Bool [B, N_all] validity of every token the tower returned (prefix tokens are always valid)."""
    tower = model.towers[modality]
    x, masks = tower.batch_inputs(batch)
    valid = tower.token_valid(x, **masks)
    b, n = tokens.shape[:2]
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    prefix = torch.ones(b, n - valid.shape[1], dtype=torch.bool, device=tokens.device)
    return torch.cat([prefix, valid.bool()], dim=1)


class LMObjective(Objective):
    """A transformers causal LM (local directory, trained jointly) generating the text after a prefix of the
    modality's tower tokens, projected into the LM's embedding space (LLaVA's 2-layer MLP projector by default)."""

    def __init__(self, cfg: ObjectiveConfig, tower_width: int):
        super().__init__(cfg)
        from transformers import AutoModelForCausalLM  # heavy import, only when an lm objective is configured

        self.modality = cfg.name.split(":", 1)[1]
        self.lm = AutoModelForCausalLM.from_pretrained(cfg.lm_path, local_files_only=True, use_safetensors=True)
        hidden = self.lm.get_input_embeddings().embedding_dim
        if cfg.projector == "linear":
            self.projector = nn.Linear(tower_width, hidden)
        else:
            self.projector = nn.Sequential(nn.Linear(tower_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, model, batch, cache):
        tokens, _ = cache.encode(self.modality)
        ids = batch["text_ids"]
        vocab = self.lm.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab:
            raise ValueError(f"objective {self.name!r}: text id {int(ids.max())} >= the LM's vocab size {vocab}; "
                             "tokenise text with the LM's tokenizer")
        text_valid = batch.get("text_valid")
        text_valid = torch.ones_like(ids, dtype=torch.bool) if text_valid is None else text_valid.bool()
        both = present(batch, self.modality) & present(batch, "text")
        prefix = self.projector(tokens)
        prefix_valid = cache_token_valid(model, self.modality, batch, tokens)
        embeds = torch.cat([prefix.to(self.lm.dtype), self.lm.get_input_embeddings()(ids)], dim=1)
        attn = torch.cat([prefix_valid, text_valid], dim=1)
        # Labels: prefix positions and padding never predicted; absent pairs contribute nothing.
        labels = torch.full(attn.shape, -100, dtype=torch.long, device=ids.device)
        keep = text_valid & both[:, None]
        labels[:, prefix.shape[1]:] = ids.masked_fill(~keep, -100)
        logits = self.lm(inputs_embeds=embeds, attention_mask=attn.long()).logits
        # Causal shift as in transformers' own loss, but normalised over the global token count.
        loss = caption_loss(logits[:, :-1], labels[:, 1:], label_smoothing=self.cfg.label_smoothing)
        cache.count("text", ids)
        return {self.name: loss}


def build_objective(cfg: ObjectiveConfig, model) -> Objective:
    cfg.validate()
    kind = cfg.kind
    if kind == "mae":
        return MAEObjective(cfg)
    if kind == "contrastive":
        return ContrastiveObjective(cfg)
    if kind == "caption":
        return CaptionObjective(cfg)
    modality = cfg.name.split(":", 1)[1]
    return LMObjective(cfg, model.towers[modality].width)


def check_objectives_fit(objectives: list[ObjectiveConfig], model) -> None:
    """One-line errors for objectives the model config (``MultiModalConfig``) cannot serve: a missing tower, MAE
    decoder or caption decoder (every tower gets a projection head, so contrastive pairs need only the towers).

    The one check of objectives against the model: ``RunConfig.validate`` runs it, so ``medfm launch`` (and its
    ``--dry-run`` preflight), ``medfm pretrain`` and the engine all refuse a misfit before anything is built."""
    for i, o in enumerate(objectives):
        for m in o.modalities:
            if m not in model.towers:
                raise ValueError(f"objectives[{i}] {o.name!r} needs model.towers.{m} (have {sorted(model.towers)})")
        if o.kind == "mae" and o.modalities[0] not in model.mae:
            raise ValueError(f"objectives[{i}] {o.name!r} needs '{o.modalities[0]}' in model.mae")
        if o.kind == "caption" and not model.caption.enabled:
            raise ValueError(f"objectives[{i}] {o.name!r} needs model.caption.enabled=true")


def active_objectives(objectives: list, plan) -> list:
    """Objectives (modules or configs) a step plan runs: those it names, or (a plan naming none) those whose
    modalities it has; all of them without a plan. The trainer and the FLOP plan of a sweep both ask this."""
    if plan is None:
        return list(objectives)
    names = tuple(getattr(plan, "objectives", ()) or ())
    if names:
        return [o for o in objectives if o.name in names]
    mods = set(plan.modalities)
    return [o for o in objectives if set(o.modalities) <= mods]


class PretrainModule(nn.Module):
    """What the engine trains: the multimodal model plus objective-owned modules (LM, projectors).

    ``forward(batch, plan_objectives)`` runs the objectives of this step in config order — identical on every
    rank, so ZeRO-3's parameter gathers match — and returns ``(losses, total, token_counts)``.
    """

    def __init__(self, model, objectives: list[Objective]):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleList(objectives)

    def active(self, plan) -> list[Objective]:
        return active_objectives(list(self.objectives), plan)

    def forward(self, batch: dict, plan=None):
        cache = StepCache(self.model, batch)
        losses: dict[str, torch.Tensor] = {}
        total = None
        for obj in self.active(plan):
            out = obj(self.model, batch, cache)
            losses.update(out)
            term = obj.weight * out[obj.name]
            total = term if total is None else total + term
        if total is None:
            raise ValueError(f"step plan {plan} runs no configured objective")
        return losses, total, dict(cache.tokens)
