"""Weighted k-nearest-neighbour classifier on L2-normalised features (DINO's kNN protocol).

Each of the k most cosine-similar training samples votes for its class with weight ``exp(sim / T)``; the normalised
votes are the class scores (so AUROC is defined, not just accuracy). Multi-label: the weighted mean of the
neighbours' label vectors. No training, no hyper-parameter fit: a direct read-out of the feature geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfm.evals.protocols.base import FeatureSplit, TaskInfo, check_train_labels, to_scores
from medfm.evals.scoring import Predictions


@dataclass
class KNNOptions:
    k: int = 20
    temperature: float = 0.07
    chunk: int = 1024  # test rows per similarity block (memory bound: chunk × n_train floats)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(task: TaskInfo, train: FeatureSplit, query: np.ndarray, opts: KNNOptions) -> np.ndarray:
    """[n_query, K] normalised vote scores."""
    bank = _normalise(train.x.astype(np.float64))
    q = _normalise(query.astype(np.float64))
    k = min(opts.k, len(bank))
    if task.kind == "multilabel":
        targets = train.y.astype(np.float64)
    else:
        targets = np.eye(task.n_outputs)[train.y.astype(np.int64)]
    out = np.zeros((len(q), targets.shape[1]))
    for start in range(0, len(q), opts.chunk):
        sim = q[start:start + opts.chunk] @ bank.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1)
        # exp((s - max)/T): the shift cancels in the normalisation and keeps exp from overflowing at small T.
        w = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / opts.temperature)
        votes = np.einsum("qk,qkc->qc", w, targets[top])
        out[start:start + opts.chunk] = votes / w.sum(axis=1, keepdims=True)
    return out


def knn_probe(task: TaskInfo, train: FeatureSplit, val: FeatureSplit | None, test: FeatureSplit,
              opts: KNNOptions | None = None) -> tuple[Predictions, dict]:
    opts = opts or KNNOptions()
    check_train_labels(task, train)
    scores = knn_scores(task, train, test.x, opts)
    pred = Predictions(task.kind, test.y, to_scores(task, scores), test.groups, list(task.class_names))
    return pred, {"k": min(opts.k, len(train)), "temperature": opts.temperature}
