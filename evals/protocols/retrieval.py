"""Cross-modal retrieval Recall@K in both directions (CLIP_benchmark's definition).

A query counts as a hit at K when *any* of its positives is among the K most similar candidates; Recall@K is the
fraction of queries that hit. Items may have several texts (``text_owner[j]`` = index of the item text j
describes): text→item has one positive per query, item→text has all of the item's texts as positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfm.evals.bootstrap import bootstrap_ci
from medfm.evals.protocols.base import ProtocolError, ProtocolResult, Row


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_hits(item_emb: np.ndarray, text_emb: np.ndarray, text_owner=None, ks: Sequence[int] = (1, 5, 10),
                   chunk: int = 2048) -> dict[str, dict[int, np.ndarray]]:
    """Per-query 0/1 hits: ``{"item->text": {k: [n_items]}, "text->item": {k: [n_texts]}}``.

    Rank is computed as "number of candidates scoring strictly higher than the best positive", so ties resolve in the
    query's favour deterministically instead of depending on a sort's order.
    """
    a, b = _normalise(item_emb), _normalise(text_emb)
    n_items, n_texts = len(a), len(b)
    owner = np.arange(n_texts) if text_owner is None else np.asarray(text_owner, dtype=np.int64)
    if len(owner) != n_texts or (n_texts and (owner.min() < 0 or owner.max() >= n_items)):
        raise ProtocolError(f"retrieval: text_owner must give an item index in [0, {n_items}) for each of "
                            f"{n_texts} texts")
    if a.shape[1] != b.shape[1]:
        raise ProtocolError(f"retrieval: item embeddings dim {a.shape[1]} != text embeddings dim {b.shape[1]}")
    best_rank_text = np.empty(n_texts, dtype=np.int64)  # text query -> rank of its item
    best_rank_item = np.full(n_items, np.iinfo(np.int64).max)  # item query -> best rank among its texts
    for s in range(0, n_texts, chunk):
        sim = b[s:s + chunk] @ a.T  # [t, items]
        own = owner[s:s + chunk]
        pos = sim[np.arange(len(own)), own]
        best_rank_text[s:s + chunk] = (sim > pos[:, None]).sum(axis=1)
    for s in range(0, n_items, chunk):
        sim = a[s:s + chunk] @ b.T  # [i, texts]
        rows = np.arange(s, min(s + chunk, n_items))
        is_pos = owner[None, :] == rows[:, None]
        best_pos = np.where(is_pos, sim, -np.inf).max(axis=1)
        rank = (sim > best_pos[:, None]).sum(axis=1)
        best_rank_item[rows] = np.where(np.isfinite(best_pos), rank, np.iinfo(np.int64).max)
    return {"item->text": {k: (best_rank_item < k).astype(np.float64) for k in ks},
            "text->item": {k: (best_rank_text < k).astype(np.float64) for k in ks}}


def retrieval(item_emb: np.ndarray, text_emb: np.ndarray, item_groups, text_owner=None, modality: str = "image",
              ks: Sequence[int] = (1, 5, 10), n_boot: int = 1000, seed: int = 0) -> ProtocolResult:
    """Recall@K rows with patient-level bootstrap CIs for both directions."""
    hits = retrieval_hits(item_emb, text_emb, text_owner, ks)
    groups = np.asarray(item_groups)
    owner = np.arange(len(text_emb)) if text_owner is None else np.asarray(text_owner)
    rows = []
    for direction, per_k in hits.items():
        g = groups if direction == "item->text" else groups[owner]
        label = direction.replace("item", modality)
        for k, h in per_k.items():
            est = bootstrap_ci(np.mean, [h], groups=g, n_boot=n_boot, seed=seed)
            rows.append(Row(f"recall@{k}", est, {"direction": label}))
    return ProtocolResult(rows, None, {"n_items": len(item_emb), "n_texts": len(text_emb)})
