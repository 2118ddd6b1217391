"""Zero-shot classification from text prompts (CLIP-style), single-label and multi-label.

Prompts live in a YAML/JSON file per task::

    templates: ["a brain MRI patch of {}.", "{} tissue on a T1 scan."]
    classes:                      # binary / multi-class / ordinal: one entry per class, in label order
      grey_matter: ["grey matter", "cortical grey matter"]
      white_matter: ["white matter"]
    # or, multi-label: one positive/negative prompt pair list per finding (negative defaults to "no {}")
    findings:
      effusion: {positive: ["pleural effusion"], negative: ["no pleural effusion"]}

Each class embedding is the mean over (synonym × template) of L2-normalised text embeddings, renormalised (the
template ensemble of the CLIP paper). Single-label: softmax over classes of ``logit_scale · cos``. Multi-label: for
each finding a 2-way softmax between its positive and negative embeddings gives P(finding), as CheXzero does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from medfm.evals.protocols.base import FeatureSplit, ProtocolError, TaskInfo, to_scores
from medfm.evals.scoring import Predictions

TextEncoder = Callable[[Sequence[str]], np.ndarray]  # list of prompts -> [n, D] embeddings (normalised or not)


@dataclass
class PromptSet:
    templates: list[str]
    classes: dict[str, list[str]]  # class -> synonyms (single-label)
    findings: dict[str, dict[str, list[str]]]  # finding -> {"positive": [...], "negative": [...]} (multi-label)


def load_prompts(path: str | Path) -> PromptSet:
    """Read and check a prompt file; every problem is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"{path}: prompt file not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        raise ProtocolError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: expected a mapping with 'templates' and 'classes' or 'findings'")
    templates = data.get("templates", ["{}"])
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and "{}" in t
                                                                   for t in templates):
        raise ProtocolError(f"{path}: templates must be a non-empty list of strings each containing '{{}}'")
    classes, findings = {}, {}
    if "classes" in data:
        if not isinstance(data["classes"], dict) or not data["classes"]:
            raise ProtocolError(f"{path}: classes must be a mapping class -> list of names")
        for name, syn in data["classes"].items():
            syn = [syn] if isinstance(syn, str) else syn
            if not isinstance(syn, list) or not syn or not all(isinstance(s, str) for s in syn):
                raise ProtocolError(f"{path}: classes.{name} must be a non-empty list of strings")
            classes[str(name)] = syn
    if "findings" in data:
        if not isinstance(data["findings"], dict) or not data["findings"]:
            raise ProtocolError(f"{path}: findings must be a mapping finding -> {{positive, negative}}")
        for name, pair in data["findings"].items():
            pair = {"positive": pair} if isinstance(pair, (list, str)) else (pair or {})
            pos = pair.get("positive", [str(name)])
            pos = [pos] if isinstance(pos, str) else pos
            neg = pair.get("negative", [f"no {p}" for p in pos])
            neg = [neg] if isinstance(neg, str) else neg
            if not pos or not neg or not all(isinstance(s, str) for s in pos + neg):
                raise ProtocolError(f"{path}: findings.{name} needs non-empty positive/negative string lists")
            findings[str(name)] = {"positive": pos, "negative": neg}
    if not classes and not findings:
        raise ProtocolError(f"{path}: has neither 'classes' nor 'findings'")
    return PromptSet(templates, classes, findings)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ensemble_embedding(encode_text: TextEncoder, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One unit vector from every (name, template) prompt: mean of normalised embeddings, renormalised."""
    prompts = [t.format(n) for n in names for t in templates]
    emb = _normalise(encode_text(prompts))
    if emb.shape[0] != len(prompts):
        raise ProtocolError(f"text encoder returned {emb.shape[0]} embeddings for {len(prompts)} prompts")
    return _normalise(emb.mean(axis=0))


def zero_shot_weights(task: TaskInfo, prompts: PromptSet, encode_text: TextEncoder) -> np.ndarray:
    """Single-label: [K, D] class embeddings in the task's class order. Multi-label: [L, 2, D] (positive, negative)."""
    if task.kind == "multilabel":
        missing = [c for c in task.class_names if c not in prompts.findings]
        if missing:
            raise ProtocolError(f"task {task.name}: prompt file has no findings entry for {missing[0]!r} "
                                f"(has {sorted(prompts.findings)})")
        return np.stack([np.stack([ensemble_embedding(encode_text, prompts.findings[c][side], prompts.templates)
                                   for side in ("positive", "negative")]) for c in task.class_names])
    missing = [c for c in task.class_names if c not in prompts.classes]
    if missing:
        raise ProtocolError(f"task {task.name}: prompt file has no classes entry for {missing[0]!r} "
                            f"(has {sorted(prompts.classes)})")
    return np.stack([ensemble_embedding(encode_text, prompts.classes[c], prompts.templates) for c in task.class_names])


def zero_shot_scores(task: TaskInfo, embeddings: np.ndarray, weights: np.ndarray, logit_scale: float = 100.0):
    """Class probabilities [n, K] (single-label) or P(finding) [n, L] (multi-label) from sample embeddings."""
    e = _normalise(embeddings)
    if task.kind == "multilabel":
        logits = logit_scale * np.einsum("nd,lsd->nls", e, weights)  # [n, L, 2]
        logits -= logits.max(axis=2, keepdims=True)
        p = np.exp(logits)
        return p[:, :, 0] / p.sum(axis=2)
    logits = logit_scale * e @ weights.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def zero_shot(task: TaskInfo, test: FeatureSplit, prompts: PromptSet, encode_text: TextEncoder,
              logit_scale: float = 100.0) -> tuple[Predictions, dict]:
    """``test.x`` must be the model's joint-space embeddings of the samples (``model.embed``), not tower features."""
    weights = zero_shot_weights(task, prompts, encode_text)
    if weights.shape[-1] != test.x.shape[1]:
        raise ProtocolError(f"task {task.name}: text embeddings have dim {weights.shape[-1]} but sample embeddings "
                            f"have dim {test.x.shape[1]} (zero-shot needs the joint embedding space)")
    probs = zero_shot_scores(task, test.x, weights, logit_scale)
    pred = Predictions(task.kind, test.y, to_scores(task, probs), test.groups, list(task.class_names))
    return pred, {"templates": len(prompts.templates), "logit_scale": logit_scale}
