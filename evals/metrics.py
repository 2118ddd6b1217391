"""Clinical classification, ranking and survival metrics on numpy arrays.

Implemented here (not wrapped) so that the bootstrap can call them thousands of times cheaply and so that every
undefined case raises one :class:`MetricError` that names what is missing; tests/test_evals_metrics.py checks each
against scikit-learn (and lifelines for the concordance index) on the same predictions.

Conventions: ``y_true`` is int class ids ``[n]`` (binary / multi-class / ordinal) or a 0/1 matrix ``[n, L]``
(multi-label); ``y_score`` is ``[n]`` (binary: score of the positive class) or ``[n, K]`` (per-class scores);
``y_pred`` is hard class ids. Metrics computed on one class of a one-vs-rest problem need both classes present.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


class MetricError(ValueError):
    """A metric is undefined on this data (e.g. AUROC of a split with one class); the message says why."""


def _as_1d(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise MetricError(f"{name}: expected a 1-D array, got shape {a.shape}")
    return a


def _check_len(*arrays):
    n = {len(a) for a in arrays}
    if len(n) != 1:
        raise MetricError(f"arrays have different lengths {sorted(n)}")
    if 0 in n:
        raise MetricError("no samples")


# ---------------------------------------------------------------------------------------------- hard labels
def confusion_matrix(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """Counts ``C[i, j]`` = samples of true class i predicted as j (class ids ``0..K-1``)."""
    t, p = _as_1d(y_true, "y_true").astype(np.int64), _as_1d(y_pred, "y_pred").astype(np.int64)
    _check_len(t, p)
    k = int(n_classes) if n_classes is not None else int(max(t.max(), p.max())) + 1
    if t.min() < 0 or p.min() < 0 or t.max() >= k or p.max() >= k:
        raise MetricError(f"class ids must lie in [0, {k}), got y_true in [{t.min()}, {t.max()}], "
                          f"y_pred in [{p.min()}, {p.max()}]")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def accuracy(y_true, y_pred) -> float:
    """Fraction correct; for a 0/1 matrix (multi-label) the subset accuracy (every label right)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise MetricError(f"y_true shape {t.shape} != y_pred shape {p.shape}")
    if t.size == 0:
        raise MetricError("no samples")
    eq = t == p
    return float(eq.all(axis=1).mean() if eq.ndim == 2 else eq.mean())


def balanced_accuracy(y_true, y_pred, n_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def f1(y_true, y_pred, average: str = "macro", n_classes: int | None = None) -> float:
    """F1 score. ``average``: "binary" (class 1), "macro" (mean over ``0..K-1``), "micro" (pooled counts).

    A 0/1 matrix is read as multi-label (per-label binary F1, then averaged). A class never true and never predicted
    scores 0, as scikit-learn's ``zero_division=0``.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim == 2:
        if t.shape != p.shape:
            raise MetricError(f"y_true shape {t.shape} != y_pred shape {p.shape}")
        tp = ((t == 1) & (p == 1)).sum(axis=0)
        fp = ((t == 0) & (p == 1)).sum(axis=0)
        fn = ((t == 1) & (p == 0)).sum(axis=0)
    else:
        cm = confusion_matrix(t, p, n_classes)
        tp = np.diag(cm)
        fp = cm.sum(axis=0) - tp
        fn = cm.sum(axis=1) - tp
    if average == "binary":
        if t.ndim == 2:
            raise MetricError("f1 average='binary' needs 1-D labels")
        tp, fp, fn = tp[1:2], fp[1:2], fn[1:2]
    elif average == "micro":
        tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
    elif average != "macro":
        raise MetricError(f"f1 average must be binary|macro|micro, got {average!r}")
    denom = 2 * tp + fp + fn
    scores = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(scores.mean())


def cohen_kappa(y_true, y_pred, weights: str | None = None, n_classes: int | None = None) -> float:
    """Cohen's κ; ``weights`` None (nominal), "linear" or "quadratic" (ordinal grades: distant errors cost more)."""
    cm = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    k = cm.shape[0]
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / cm.sum()
    if weights is None:
        w = 1.0 - np.eye(k)
    else:
        d = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]).astype(np.float64)
        if weights == "linear":
            w = d
        elif weights == "quadratic":
            w = d**2
        else:
            raise MetricError(f"cohen_kappa weights must be None|linear|quadratic, got {weights!r}")
    denom = (w * expected).sum()
    if denom == 0:
        raise MetricError("Cohen's kappa undefined: both raters used a single identical class")
    return float(1.0 - (w * cm).sum() / denom)


# ---------------------------------------------------------------------------------------------- scores
def _binary_auroc(t: np.ndarray, s: np.ndarray, what: str) -> float:
    pos = t == 1
    n_pos = int(pos.sum())
    n_neg = len(t) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        raise MetricError(f"AUROC undefined for {what}: only {only} samples in this split (n={len(t)})")
    # Mann-Whitney U with mid-ranks for ties == area under the ROC curve with ties counted half.
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _binary_ap(t: np.ndarray, s: np.ndarray, what: str) -> float:
    n_pos = int((t == 1).sum())
    if n_pos == 0:
        raise MetricError(f"AUPRC undefined for {what}: no positive samples in this split (n={len(t)})")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], (t[order] == 1)
    # One operating point per distinct threshold (the last index of each run of tied scores).
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(t_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    # Step-wise average precision (no interpolation): sum over thresholds of ΔR · P, as scikit-learn.
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _one_vs_rest(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """(indicator [n, K], scores [n, K]) for multi-class ids or multi-label indicators."""
    t, s = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    if s.ndim != 2:
        raise MetricError(f"y_score: expected [n, K] scores, got shape {s.shape}")
    if t.ndim == 1:
        k = s.shape[1]
        if t.min() < 0 or t.max() >= k:
            raise MetricError(f"class ids must lie in [0, {k}) to match {k} score columns")
        t = np.eye(k, dtype=np.int64)[t.astype(np.int64)]
    if t.shape != s.shape:
        raise MetricError(f"y_true shape {t.shape} != y_score shape {s.shape}")
    _check_len(t, s)
    return t.astype(np.int64), s


def _averaged(fn, y_true, y_score, average: str, name: str, class_names=None) -> float:
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 1:  # binary
        t = _as_1d(y_true, "y_true")
        _check_len(t, s)
        return fn(t.astype(np.int64), s, "the positive class")
    t, s = _one_vs_rest(y_true, s)
    if average == "micro":
        return fn(t.ravel(), s.ravel(), "the pooled labels")
    if average != "macro":
        raise MetricError(f"{name} average must be macro|micro, got {average!r}")
    names = list(class_names) if class_names is not None else [f"class {j}" for j in range(t.shape[1])]
    return float(np.mean([fn(t[:, j], s[:, j], names[j]) for j in range(t.shape[1])]))


def auroc(y_true, y_score, average: str = "macro", class_names=None) -> float:
    """Area under the ROC curve: binary ([n] scores) or one-vs-rest per class/label, macro- or micro-averaged."""
    return _averaged(_binary_auroc, y_true, y_score, average, "auroc", class_names)


def auprc(y_true, y_score, average: str = "macro", class_names=None) -> float:
    """Average precision (area under the precision-recall curve, step-wise as scikit-learn)."""
    return _averaged(_binary_ap, y_true, y_score, average, "auprc", class_names)


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of a binary problem, one point per distinct score, starting at (0, 0)."""
    t, s = _as_1d(y_true, "y_true").astype(np.int64), _as_1d(y_score, "y_score").astype(np.float64)
    _check_len(t, s)
    n_pos, n_neg = int((t == 1).sum()), int((t != 1).sum())
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"ROC curve undefined: only {'positive' if n_neg == 0 else 'negative'} samples (n={len(t)})")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order] == 1
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(t_sorted)[last]
    fps = (last + 1) - tps
    return (np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, s_sorted[last]])


def precision_recall_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of a binary problem, one point per distinct score (highest threshold first)."""
    t, s = _as_1d(y_true, "y_true").astype(np.int64), _as_1d(y_score, "y_score").astype(np.float64)
    _check_len(t, s)
    n_pos = int((t == 1).sum())
    if n_pos == 0:
        raise MetricError(f"PR curve undefined: no positive samples (n={len(t)})")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order] == 1
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(t_sorted)[last]
    return tps / (last + 1), tps / n_pos


def sensitivity_at_specificity(y_true, y_score, specificity: float = 0.9) -> float:
    """Highest sensitivity (TPR) among ROC operating points whose specificity (1 - FPR) is at least the target.

    The screening operating point: "how many cases do we catch if we accept at most 10% false alarms".
    """
    if not 0.0 <= specificity <= 1.0:
        raise MetricError(f"specificity must be in [0, 1], got {specificity}")
    fpr, tpr, _ = roc_curve(y_true, y_score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())


# ---------------------------------------------------------------------------------------------- survival
def concordance_index(time, risk, event) -> float:
    """Harrell's C: over comparable pairs (the earlier time had an event), the fraction where the earlier one has the
    higher ``risk``; ties in risk count 1/2. Two events at the same time are not comparable; an event and a censoring
    at the same time are (the censored patient outlived the event), as lifelines.

    Note the convention: ``risk`` high = early event (a Cox partial hazard). lifelines' ``concordance_index`` takes a
    survival-time prediction, i.e. ``-risk``.
    """
    t = _as_1d(time, "time").astype(np.float64)
    r = _as_1d(risk, "risk").astype(np.float64)
    e = _as_1d(event, "event").astype(bool)
    _check_len(t, r, e)
    num = 0.0
    den = 0
    # O(n^2) in blocks of rows: exact, memory-bounded, and fast for the few thousand patients an eval holds.
    block = max(1, 2_000_000 // max(len(t), 1))
    for start in range(0, len(t), block):
        sl = slice(start, start + block)
        ti, ri, ei = t[sl, None], r[sl, None], e[sl, None]
        comparable = ei & ((ti < t[None, :]) | ((ti == t[None, :]) & ~e[None, :]))
        den += int(comparable.sum())
        num += float((comparable & (ri > r[None, :])).sum()) + 0.5 * float((comparable & (ri == r[None, :])).sum())
    if den == 0:
        raise MetricError("concordance index undefined: no comparable pairs (no events before other times)")
    return num / den


# ---------------------------------------------------------------------------------------------- segmentation
# Per-sample, per-class overlap and boundary metrics on label maps, with MONAI's conventions (tested equal to
# monai.metrics.compute_dice / compute_hausdorff_distance(percentile=95)): a class absent from the ground truth of a
# sample gives NaN (excluded from the mean, MONAI's ``ignore_empty``); voxels labelled < 0 are outside the image
# (collate padding) and count for neither mask.
def dice_score(pred_mask, true_mask) -> float:
    """2|P∩T| / (|P| + |T|) of two boolean masks; NaN when T is empty."""
    p, t = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    if p.shape != t.shape:
        raise MetricError(f"dice: prediction shape {p.shape} != ground truth shape {t.shape}")
    nt = int(t.sum())
    if nt == 0:
        return float("nan")
    return float(2.0 * np.logical_and(p, t).sum() / (p.sum() + nt))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion (face connectivity; outside the array counts as background)."""
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def hausdorff_distance(pred_mask, true_mask, percentile: float = 95.0, spacing=None) -> float:
    """Symmetric percentile Hausdorff distance between the surfaces of two boolean masks, in units of ``spacing``
    (per axis; default 1 voxel): the larger of the two directed ``percentile`` surface distances.

    Distances come from Euclidean distance transforms of each surface's complement (scipy.ndimage). NaN when the
    ground truth is empty; when only the prediction is empty the distance is undefined (MONAI gives inf) and we
    return the array's diagonal, the largest distance the image allows, so that a missed structure is the worst
    case and means stay finite.
    """
    from scipy.ndimage import distance_transform_edt

    p, t = np.asarray(pred_mask, bool), np.asarray(true_mask, bool)
    if p.shape != t.shape:
        raise MetricError(f"hausdorff: prediction shape {p.shape} != ground truth shape {t.shape}")
    sp = np.ones(p.ndim) if spacing is None else np.broadcast_to(np.asarray(spacing, np.float64), (p.ndim,))
    if not t.any():
        return float("nan")
    if not p.any():
        return float(np.sqrt(np.sum(((np.array(p.shape) - 1) * sp) ** 2)))
    sp_, st_ = _surface(p), _surface(t)
    d_pt = distance_transform_edt(~st_, sampling=sp)[sp_]  # each predicted surface voxel -> nearest true surface
    d_tp = distance_transform_edt(~sp_, sampling=sp)[st_]
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def segmentation_scores(pred, true, n_classes: int, spacing=None, percentile: float = 95.0,
                        include_background: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dice [C], hd [C]) of one sample's label maps for classes 1..K-1 (0..K-1 with include_background).
    Voxels with ``true < 0`` are ignored in both maps."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise MetricError(f"segmentation: prediction shape {pred.shape} != ground truth shape {true.shape}")
    valid = true >= 0
    classes = range(0 if include_background else 1, n_classes)
    dice = np.array([dice_score((pred == c) & valid, (true == c) & valid) for c in classes])
    hd = np.array([hausdorff_distance((pred == c) & valid, (true == c) & valid, percentile, spacing)
                   for c in classes])
    return dice, hd


def nanmean_defined(values) -> float:
    """Mean of the defined (non-NaN) entries; MetricError when there is none (the class never occurs)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise MetricError("class absent from every ground-truth mask of the split")
    return float(v.mean())
