"""medfm.evals numbers vs the references the field reports with: scikit-learn (AUROC, AUPRC, κ, balanced accuracy)
and CLIP_benchmark (zero-shot top-1 / mean per-class recall, retrieval Recall@K).

CLIP_benchmark is not a dependency; its formulas are re-derived below from its source, line for line, and cited:
LAION-AI/CLIP_benchmark, clip_benchmark/metrics/zeroshot_classification.py (``zero_shot_classifier``: per class,
normalise each template's text embedding, mean, renormalise; ``run_classification``: ``logits = 100 *
normalize(image_features) @ classifier``; ``accuracy``: top-k hits / n; ``evaluate``: ``mean_per_class_recall =
balanced_accuracy_score(target, logits.argmax(1))``) and clip_benchmark/metrics/zeroshot_retrieval.py
(``scores = texts_emb @ images_emb.T``; ``positive_pairs[text, texts_image_index] = True``; ``recall_at_k`` via
``torch.topk`` + one-hot counts; ``image_retrieval_recall@k = (recall_at_k(scores, positives) > 0).mean()`` over text
queries, ``text_retrieval_recall@k`` the same on the transposes over image queries).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from medfm.evals import metrics as M
from medfm.evals.protocols.base import FeatureSplit, TaskInfo
from medfm.evals.protocols.retrieval import retrieval_hits
from medfm.evals.protocols.zeroshot import PromptSet, zero_shot
from medfm.evals.scoring import metric_functions


# ------------------------------------------------------------------ CLIP_benchmark, re-derived (see module docstring)
def cb_zero_shot_classifier(encode_text, classnames, templates) -> torch.Tensor:
    weights = []
    for c in classnames:
        emb = torch.as_tensor(encode_text([t.format(c) for t in templates]), dtype=torch.float32)
        class_embedding = F.normalize(emb, dim=-1).mean(dim=0)
        class_embedding /= class_embedding.norm()
        weights.append(class_embedding)
    return torch.stack(weights, dim=1)


def cb_accuracy(output, target, topk=(1,)):
    pred = output.float().topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    # CLIP_benchmark writes float(<1-element array>), which numpy >= 2.4 refuses; .item() is the same number.
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


def cb_recall_at_k(scores, positive_pairs, k):
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = F.one_hot(topk_indices, num_classes=nb_images)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def cb_retrieval(images_emb, texts_emb, texts_image_index, ks):
    images_emb = F.normalize(torch.as_tensor(images_emb, dtype=torch.float32), dim=-1)
    texts_emb = F.normalize(torch.as_tensor(texts_emb, dtype=torch.float32), dim=-1)
    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (cb_recall_at_k(scores, positive_pairs, k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (cb_recall_at_k(scores.T, positive_pairs.T, k) > 0).float().mean().item()
    return out


# ------------------------------------------------------------------ fixtures
def _hash_encoder(dim=24, anchors=None):
    """A deterministic text encoder: each prompt's embedding is seeded by its text (plus an optional class anchor, so
    images built near an anchor are mostly classified right and the accuracy is neither 0 nor 1)."""

    def encode(prompts):
        out = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(dim)
            for name, a in (anchors or {}).items():
                if name in p:
                    v = v * 0.5 + a
            out.append(v)
        return np.asarray(out, dtype=np.float32)

    return encode


def test_zero_shot_matches_clip_benchmark():
    rng = np.random.default_rng(0)
    dim, classes = 24, ["normal", "pneumonia", "effusion", "nodule", "fracture", "edema"]
    anchors = {c: rng.standard_normal(dim) * 2 for c in classes}
    encode = _hash_encoder(dim, anchors)
    templates = ["a chest x-ray showing {}.", "{} on a radiograph.", "an image of {}"]
    y = rng.integers(0, len(classes), 300)
    x = np.stack([anchors[classes[c]] for c in y]) + rng.standard_normal((300, dim)) * 5.0
    task = TaskInfo("finding", "multiclass", classes)
    pred, _ = zero_shot(task, FeatureSplit(x.astype(np.float32), y, np.arange(300)),
                        PromptSet(templates, {c: [c] for c in classes}, {}), encode, logit_scale=100.0)
    fns = metric_functions("multiclass", len(classes), classes)
    ours = {"accuracy": fns["accuracy"](y, pred.scores), "balanced_accuracy": fns["balanced_accuracy"](y, pred.scores)}

    classifier = cb_zero_shot_classifier(encode, classes, templates)
    logits = 100.0 * F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1) @ classifier
    target = torch.as_tensor(y)
    (acc1,) = cb_accuracy(logits, target, topk=(1,))
    mpcr = skm.balanced_accuracy_score(target, logits.argmax(axis=1))

    assert 0.2 < acc1 < 0.95, f"fixture should be neither trivial nor hopeless, got top-1 {acc1}"
    assert ours["accuracy"] == pytest.approx(acc1, abs=1e-12)
    assert ours["balanced_accuracy"] == pytest.approx(mpcr, abs=1e-12)
    # Per-sample agreement, not just the same averages: the same argmax everywhere.
    np.testing.assert_array_equal(pred.scores.argmax(1), logits.argmax(1).numpy())


@pytest.mark.parametrize("texts_per_image", [1, 5])
def test_retrieval_recall_matches_clip_benchmark(texts_per_image):
    rng = np.random.default_rng(texts_per_image)
    n_img, dim = 60, 16
    images = rng.standard_normal((n_img, dim))
    owner = np.repeat(np.arange(n_img), texts_per_image)
    texts = images[owner] + rng.standard_normal((len(owner), dim)) * 1.2  # noisy captions of their image
    ks = (1, 5, 10)
    hits = retrieval_hits(images, texts, owner, ks)
    ref = cb_retrieval(images, texts, torch.as_tensor(owner), ks)
    for k in ks:
        assert hits["text->item"][k].mean() == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert hits["item->text"][k].mean() == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-6)
    assert 0.0 < ref["image_retrieval_recall@1"] < 1.0, "fixture should be neither trivial nor hopeless"


def test_retrieval_ties_are_the_documented_difference():
    """With exactly tied similarities CLIP_benchmark's ``torch.topk`` picks one member of the tie (here the lowest
    index); medfm averages over tie orders, so a query whose own image is one of 3 tied candidates scores 1/3 at K=1
    (chance within the tie) rather than 0 or 1 depending on a sort. Equal to CLIP_benchmark without ties (any real,
    continuous embedding), and here equal on average because topk's pick is arbitrary."""
    images = np.repeat(np.eye(4), 3, axis=0)  # 12 images in 4 groups of 3 identical embeddings
    texts = images.copy()
    owner = np.arange(12)
    hits = retrieval_hits(images, texts, owner, (1,))
    ref = cb_retrieval(images, texts, torch.as_tensor(owner), (1,))
    assert hits["text->item"][1].mean() == pytest.approx(1 / 3)
    assert ref["image_retrieval_recall@1"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ scikit-learn
def _scores_with_ties(rng, n):
    return np.round(rng.random(n), 2)  # two decimals: many exact ties, which is where implementations diverge


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = np.clip(_scores_with_ties(rng, 200) + 0.3 * y, 0, 1)
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    hard = (s >= 0.5).astype(int)
    assert M.cohen_kappa(y, hard) == pytest.approx(skm.cohen_kappa_score(y, hard), abs=1e-12)
    assert M.balanced_accuracy(y, hard) == pytest.approx(skm.balanced_accuracy_score(y, hard), abs=1e-12)
    assert M.f1(y, hard, "binary") == pytest.approx(skm.f1_score(y, hard), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_and_ordinal_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k, n = 5, 300
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    hard = p.argmax(1)
    assert M.auroc(y, p, "macro") == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"),
                                                   abs=1e-12)
    onehot = np.eye(k)[y]
    assert M.auroc(y, p, "micro") == pytest.approx(skm.roc_auc_score(onehot, p, average="micro"), abs=1e-12)
    assert M.auprc(y, p, "macro") == pytest.approx(skm.average_precision_score(onehot, p, average="macro"), abs=1e-12)
    assert M.auprc(y, p, "micro") == pytest.approx(skm.average_precision_score(onehot, p, average="micro"), abs=1e-12)
    for w in (None, "linear", "quadratic"):
        assert M.cohen_kappa(y, hard, w, k) == pytest.approx(skm.cohen_kappa_score(y, hard, weights=w), abs=1e-12)
    assert M.f1(y, hard, "macro", k) == pytest.approx(skm.f1_score(y, hard, average="macro"), abs=1e-12)


def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(7)
    n, L = 250, 4
    y = (rng.random((n, L)) < [0.1, 0.3, 0.5, 0.2]).astype(int)
    s = np.clip(_scores_with_ties(rng, n * L).reshape(n, L) + 0.25 * y, 0, 1)
    for avg in ("macro", "micro"):
        assert M.auroc(y, s, avg) == pytest.approx(skm.roc_auc_score(y, s, average=avg), abs=1e-12)
        assert M.auprc(y, s, avg) == pytest.approx(skm.average_precision_score(y, s, average=avg), abs=1e-12)
