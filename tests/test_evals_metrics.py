"""Every evals metric equals scikit-learn's (lifelines' for the C-index) on the same predictions; bootstrap CIs
contain the point estimate, shrink with n, and respect patients; undefined cases give a clear message."""

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from medfm.evals import metrics as M
from medfm.evals.bootstrap import MIN_VALID_SHARE, bootstrap_ci
from medfm.evals.scoring import Predictions, score


def _binary(n=300, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = y * 0.8 + rng.normal(0, 1, n)
    if ties:
        s = np.round(s, 1)  # many tied scores exercise the tie handling
    return y, s


def _multiclass(n=400, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("ties", [False, True])
def test_binary_metrics_equal_sklearn(ties):
    y, s = _binary(ties=ties)
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    for spec in (0.8, 0.9, 0.95):
        want = tpr[fpr <= 1 - spec + 1e-12].max()
        assert M.sensitivity_at_specificity(y, s, spec) == pytest.approx(want)
    ours_fpr, ours_tpr, _ = M.roc_curve(y, s)
    np.testing.assert_allclose(ours_fpr, fpr)
    np.testing.assert_allclose(ours_tpr, tpr)
    yp = (s > 0.4).astype(int)
    assert M.accuracy(y, yp) == pytest.approx(skm.accuracy_score(y, yp))
    assert M.balanced_accuracy(y, yp) == pytest.approx(skm.balanced_accuracy_score(y, yp))
    assert M.f1(y, yp, "binary") == pytest.approx(skm.f1_score(y, yp))
    assert M.cohen_kappa(y, yp) == pytest.approx(skm.cohen_kappa_score(y, yp))


def test_multiclass_metrics_equal_sklearn():
    y, p = _multiclass()
    yp = p.argmax(1)
    k = p.shape[1]
    assert M.auroc(y, p, "macro") == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert M.auroc(y, p, "micro") == pytest.approx(skm.roc_auc_score(label_binarize(y, classes=range(k)), p,
                                                                      average="micro"))
    assert M.auprc(y, p, "macro") == pytest.approx(skm.average_precision_score(label_binarize(y, classes=range(k)),
                                                                               p, average="macro"))
    for avg in ("macro", "micro"):
        assert M.f1(y, yp, avg, k) == pytest.approx(skm.f1_score(y, yp, average=avg, labels=range(k)))
    assert M.balanced_accuracy(y, yp) == pytest.approx(skm.balanced_accuracy_score(y, yp))
    for w in (None, "linear", "quadratic"):
        assert M.cohen_kappa(y, yp, w) == pytest.approx(skm.cohen_kappa_score(y, yp, weights=w))
    np.testing.assert_array_equal(M.confusion_matrix(y, yp), skm.confusion_matrix(y, yp))


def test_multilabel_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (250, 5))
    s = y * 0.7 + rng.normal(0, 1, y.shape)
    for avg in ("macro", "micro"):
        assert M.auroc(y, s, avg) == pytest.approx(skm.roc_auc_score(y, s, average=avg))
        assert M.auprc(y, s, avg) == pytest.approx(skm.average_precision_score(y, s, average=avg))
        yp = (s > 0.5).astype(int)
        assert M.f1(y, yp, avg) == pytest.approx(skm.f1_score(y, yp, average=avg, zero_division=0))
    assert M.accuracy(y, (s > 0.5).astype(int)) == pytest.approx(skm.accuracy_score(y, (s > 0.5).astype(int)))


def test_concordance_index_equals_lifelines():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(0)
    t = rng.integers(1, 40, 200).astype(float)  # integer times: plenty of ties in time
    e = rng.integers(0, 2, 200)
    risk = -t + rng.normal(0, 8, 200)
    risk[:20] = np.round(risk[:20])  # and some ties in risk
    assert M.concordance_index(t, risk, e) == pytest.approx(concordance_index(t, -risk, e))


def test_single_class_auroc_is_a_clear_error():
    with pytest.raises(M.MetricError, match="only negative samples"):
        M.auroc(np.zeros(10, int), np.linspace(0, 1, 10))
    y, p = _multiclass(n=50, k=3)
    y[y == 2] = 0  # class 2 absent from the split
    with pytest.raises(M.MetricError, match="AUROC undefined for effusion"):
        M.auroc(y, p, class_names=["normal", "nodule", "effusion"])
    pred = Predictions("binary", np.zeros(10, int), np.linspace(0, 1, 10), np.arange(10))
    table = score(pred, n_boot=20)
    assert isinstance(table["auroc"], str) and "only negative" in table["auroc"]
    assert table["accuracy"].value == pytest.approx(0.5)  # defined metrics still reported


def test_bootstrap_contains_estimate_shrinks_and_is_seeded():
    widths = []
    for n in (100, 400, 1600):
        y, s = _binary(n=n, seed=n)
        est = bootstrap_ci(M.auroc, [y, s], n_boot=300, seed=0)
        assert est.low <= est.value <= est.high
        assert est.n == n and est.n_boot == 300
        widths.append(est.high - est.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 2.5  # ~sqrt(16) = 4 in theory
    y, s = _binary(n=200)
    a = bootstrap_ci(M.auroc, [y, s], n_boot=100, seed=7)
    b = bootstrap_ci(M.auroc, [y, s], n_boot=100, seed=7)
    assert (a.low, a.high) == (b.low, b.high)


def test_bootstrap_resamples_patients_not_samples():
    # 40 patients with 10 near-identical samples each: a sample-level bootstrap thinks n=400 and is far too narrow.
    rng = np.random.default_rng(0)
    y_pat = rng.integers(0, 2, 40)
    s_pat = y_pat * 0.5 + rng.normal(0, 1, 40)
    y = np.repeat(y_pat, 10)
    s = np.repeat(s_pat, 10) + rng.normal(0, 0.01, 400)
    groups = np.repeat(np.arange(40), 10)
    clustered = bootstrap_ci(M.auroc, [y, s], groups=groups, n_boot=300)
    naive = bootstrap_ci(M.auroc, [y, s], n_boot=300)
    assert clustered.n_groups == 40 and naive.n_groups == 400
    assert (clustered.high - clustered.low) > 2 * (naive.high - naive.low)


def test_interval_stays_in_the_metric_range_and_counts_its_resamples():
    """A near-perfect AUROC on few patients: the interval is clipped to [0, 1] and states n, n_patients and how many
    resamples were valid (single-class resamples are counted, not silently dropped)."""
    y = np.array([0, 1] * 6)
    s = y + np.random.default_rng(0).normal(0, 0.05, 12)
    groups = np.arange(12) // 2  # 6 patients with one negative and one positive each: every resample is valid
    est = bootstrap_ci(M.auroc, [y, s], groups=groups, n_boot=200, bounds=(0.0, 1.0))
    assert 0.0 <= est.low <= est.value <= est.high <= 1.0
    assert (est.n, est.n_groups, est.n_boot, est.n_resamples, est.unstable) == (12, 6, 200, 200, False)
    # a shifted metric outside its range still reports an in-range interval
    shifted = bootstrap_ci(lambda a, b: M.auroc(a, b) + 0.5, [y, s], groups=groups, n_boot=50, bounds=(0.0, 1.0))
    assert shifted.high <= 1.0 and shifted.value <= 1.0
    d = est.to_dict()
    assert d["n_patients"] == 6 and d["n_boot"] == 200 and d["n_resamples"] == 200 and d["unstable"] is False


def test_too_few_valid_resamples_is_unstable_not_a_narrow_interval():
    """5 patients, one per sample: most patient resamples hold a single class, where AUROC is undefined. Old code
    dropped them and printed the interval of the lucky rest (or raised); now the row is unstable, no interval."""
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    est = bootstrap_ci(M.auroc, [y, s], groups=np.arange(5), n_boot=400, seed=0)
    assert est.n_resamples == 400 and est.n_boot < MIN_VALID_SHARE * 400
    assert est.unstable and np.isnan(est.low) and np.isnan(est.high)
    assert est.value == pytest.approx(M.auroc(y, s))
    from medfm.evals.protocols.base import Row
    from medfm.evals.report import build_report, markdown_table
    from medfm.evals.suite import TaskResult

    report = build_report([TaskResult("ecg", "logistic", "binary", "signal", "ok", [Row("auroc", est)])], "s", {})
    row = report["results"][0]
    assert row["unstable"] is True and row["ci"] == [None, None] and row["n_valid_resamples"] == est.n_boot
    assert "unstable" in markdown_table(report)


def test_score_reports_every_kind():
    y, p = _multiclass(n=120, k=3)
    table = score(Predictions("ordinal", y, p, np.arange(120)), n_boot=50)
    assert {"accuracy", "auroc_macro", "kappa_quadratic"} <= set(table)
    assert table["accuracy"].value == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    rng = np.random.default_rng(0)
    t, e = rng.exponential(10, 80), rng.integers(0, 2, 80)
    surv = score(Predictions("survival", t, -t, np.arange(80), event=e), n_boot=50)
    assert surv["c_index"].value == pytest.approx(1.0)
