"""Cross-modal retrieval Recall@K in both directions: CLIP_benchmark's definition, with duplicate texts and ties
handled so that a model that knows nothing scores chance.

CLIP_benchmark: a query counts as a hit at K when *any* of its positives is among the K most similar candidates;
Recall@K is the fraction of queries that hit. Items may have several texts (``text_owner[j]`` = the item text j
describes).

Medical captions repeat (templated reports: "no acute findings"), so texts are also grouped by ``text_keys``
(identical strings share a key): item→text ranks the *distinct* texts, and an item's positives are the keys of its
texts; text→item ranks the items, and a text's positives are every item that has a text with the same key
(multi-positive recall). Without this, a query's positive has indistinguishable twins and recall measures which twin a
sort happened to put first.

Ties (similarities within ``TIE_TOL``) are *averaged*: a hit counts the probability that a uniformly random order of
the tied candidates puts a positive in the top K. Constant or all-zero embeddings therefore score exactly chance
(reported beside each row), where counting only strictly higher candidates gave them Recall@1 = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln

from medfm.evals.bootstrap import bootstrap_ci
from medfm.evals.protocols.base import ProtocolError, ProtocolResult, Row

TIE_TOL = 1e-6  # cosine similarities this close are one tie (identical inputs batched differently differ by ~1e-7)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _log_falling(n: np.ndarray, r: np.ndarray) -> np.ndarray:
    """log(n! / (n - r)!) for 0 <= r <= n."""
    return gammaln(n + 1.0) - gammaln(n - r + 1.0)


def expected_hits(sim: np.ndarray, pos: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """P(a positive is in the top K) per query [q] for similarities ``sim`` [q, c] and positives ``pos`` [q, c],
    tied candidates in uniformly random order. A query without positives scores 0."""
    best = np.where(pos, sim, -np.inf).max(axis=1)
    has = np.isfinite(best)
    best = np.where(has, best, 0.0)[:, None]
    above = ((sim > best + TIE_TOL) & ~pos).sum(axis=1)  # negatives ranked before every positive
    tie = np.abs(sim - best) <= TIE_TOL
    t_pos, t_neg = (tie & pos).sum(axis=1), (tie & ~pos).sum(axis=1)
    out = {}
    for k in ks:
        r = np.clip(k - above, 0, t_pos + t_neg)  # places of the top K left to the tie group
        # P(the first r of a random order of t_pos positives and t_neg negatives are all negative)
        rr = np.minimum(r, t_neg)
        log_miss = _log_falling(t_neg.astype(float), rr) - _log_falling((t_pos + t_neg).astype(float), rr)
        miss = np.where(r > t_neg, 0.0, np.exp(log_miss))
        out[k] = np.where(has & (r > 0), 1.0 - miss, 0.0)
    return out


def _keys(text_keys, n_texts: int) -> np.ndarray:
    if text_keys is None:
        return np.arange(n_texts)
    keys = np.asarray(list(text_keys), dtype=object)
    if len(keys) != n_texts:
        raise ProtocolError(f"retrieval: {len(keys)} text keys for {n_texts} texts")
    _, inverse = np.unique(keys.astype(str), return_inverse=True)
    return inverse.astype(np.int64)


def retrieval_hits(item_emb: np.ndarray, text_emb: np.ndarray, text_owner=None, ks: Sequence[int] = (1, 5, 10),
                   text_keys=None, chunk: int = 1024, chance: bool = False) -> dict[str, dict[int, np.ndarray]]:
    """Per-query hits (expected over tie orders): ``{"item->text": {k: [n_items]}, "text->item": {k: [n_texts]}}``.

    ``text_owner[j]``: the item text j describes (default: text j describes item j). ``text_keys[j]``: texts with
    equal keys (their strings) are one candidate and one positive set. ``chance=True`` returns what a model with
    constant embeddings scores instead (the chance level of each query).
    """
    a, b = _normalise(item_emb), _normalise(text_emb)
    n_items, n_texts = len(a), len(b)
    owner = np.arange(n_texts) if text_owner is None else np.asarray(text_owner, dtype=np.int64)
    if len(owner) != n_texts or (n_texts and (owner.min() < 0 or owner.max() >= n_items)):
        raise ProtocolError(f"retrieval: text_owner must give an item index in [0, {n_items}) for each of "
                            f"{n_texts} texts")
    if a.shape[1] != b.shape[1]:
        raise ProtocolError(f"retrieval: item embeddings dim {a.shape[1]} != text embeddings dim {b.shape[1]}")
    keys = _keys(text_keys, n_texts)
    n_keys = int(keys.max()) + 1 if n_texts else 0
    first = np.full(n_keys, -1)
    first[keys[::-1]] = np.arange(n_texts)[::-1]  # one embedding per distinct text: its first occurrence
    cand = b[first]
    positive = np.zeros((n_items, n_keys), dtype=bool)  # item i has a text with key u
    positive[owner, keys] = True
    if chance:
        a, cand, b = np.zeros_like(a), np.zeros_like(cand), np.zeros_like(b)
    i2t = {k: np.empty(n_items) for k in ks}
    t2i = {k: np.empty(n_texts) for k in ks}
    for s in range(0, n_items, chunk):
        got = expected_hits(a[s:s + chunk] @ cand.T, positive[s:s + chunk], ks)
        for k in ks:
            i2t[k][s:s + chunk] = got[k]
    for s in range(0, n_texts, chunk):
        got = expected_hits(b[s:s + chunk] @ a.T, positive[:, keys[s:s + chunk]].T, ks)
        for k in ks:
            t2i[k][s:s + chunk] = got[k]
    return {"item->text": i2t, "text->item": t2i}


def retrieval(item_emb: np.ndarray, text_emb: np.ndarray, item_groups, text_owner=None, modality: str = "image",
              ks: Sequence[int] = (1, 5, 10), n_boot: int = 1000, seed: int = 0, texts=None) -> ProtocolResult:
    """Recall@K rows with patient-level bootstrap CIs for both directions; ``texts`` (the strings) groups
    identical texts into one positive set. ``info`` states the distinct texts and each row's chance level."""
    hits = retrieval_hits(item_emb, text_emb, text_owner, ks, text_keys=texts)
    base = retrieval_hits(item_emb, text_emb, text_owner, ks, text_keys=texts, chance=True)
    groups = np.asarray(item_groups)
    owner = np.arange(len(text_emb)) if text_owner is None else np.asarray(text_owner)
    rows, chance = [], {}
    for direction, per_k in hits.items():
        g = groups if direction == "item->text" else groups[owner]
        label = direction.replace("item", modality)
        for k, h in per_k.items():
            est = bootstrap_ci(np.mean, [h], groups=g, n_boot=n_boot, seed=seed, bounds=(0.0, 1.0))
            rows.append(Row(f"recall@{k}", est, {"direction": label}))
            chance[f"{label} recall@{k}"] = round(float(base[direction][k].mean()), 4)
    n_distinct = len(set(_keys(texts, len(text_emb)).tolist()))
    return ProtocolResult(rows, None, {"n_items": len(item_emb), "n_texts": len(text_emb),
                                       "n_distinct_texts": n_distinct, "chance": chance,
                                       "ties": f"averaged (similarities within {TIE_TOL:g})"})
