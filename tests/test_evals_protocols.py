"""Protocols on real clinical tables shipped with packages (no downloads): scikit-learn's breast_cancer (Wisconsin
FNA features, 569 patients) as a feature matrix for the probes, lifelines' Rossi recidivism table for the Cox
prognosis, plus exact checks of kNN voting, zero-shot prompt ensembling and retrieval recall."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from medfm.evals.protocols.base import FeatureSplit, ProtocolError, TaskInfo
from medfm.evals.protocols.fewshot import FewShotOptions, few_shot
from medfm.evals.protocols.generation import KeywordLabeller, corpus_bleu, generation_metrics, rouge_l
from medfm.evals.protocols.knn import KNNOptions, knn_probe
from medfm.evals.protocols.linear import LogisticOptions, MAEProbeOptions, logistic_probe, mae_linear_probe
from medfm.evals.protocols.prognosis import cox_prognosis
from medfm.evals.protocols.retrieval import retrieval, retrieval_hits
from medfm.evals.protocols.zeroshot import load_prompts, zero_shot
from medfm.evals.scoring import score


@pytest.fixture(scope="module")
def cancer():
    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target
    rng = np.random.default_rng(0)
    split = rng.choice(["train", "val", "test"], size=len(y), p=[0.6, 0.15, 0.25])
    groups = np.array([f"p{i}" for i in range(len(y))])
    parts = {s: FeatureSplit(x[split == s], y[split == s], groups[split == s]) for s in ("train", "val", "test")}
    return TaskInfo("breast_cancer", "binary", ["malignant", "benign"]), parts


def test_logistic_probe_sweeps_c_on_val(cancer):
    task, p = cancer
    pred, info = logistic_probe(task, p["train"], p["val"], p["test"], LogisticOptions(c_grid=(1e-3, 1e-1, 1e1)))
    table = score(pred, n_boot=100)
    assert table["auroc"].value > 0.97 and table["accuracy"].value > 0.9
    assert len(info["val_scores"]) >= 5  # coarse grid + refinements
    # Without a val split the C is chosen on a patient hold-out of train, and still works.
    pred2, _ = logistic_probe(task, p["train"], None, p["test"], LogisticOptions(c_grid=(1e-2, 1.0)))
    assert score(pred2, n_boot=0)["auroc"].value > 0.97


def test_mae_probe_and_knn_on_real_table(cancer):
    task, p = cancer
    pred, info = mae_linear_probe(task, p["train"], p["val"], p["test"],
                                  MAEProbeOptions(epochs=60, warmup_epochs=6))  # MAE defaults: LARS, lr 6.4
    assert score(pred, n_boot=0)["auroc"].value > 0.95
    assert info["steps"] > 0
    sgd, _ = mae_linear_probe(task, p["train"], None, p["test"], MAEProbeOptions(epochs=20, batch_size=64,
                                                                                 optimizer="sgd", base_lr=0.4))
    assert score(sgd, n_boot=0)["auroc"].value > 0.95
    # kNN needs comparable feature scales: standardise as an encoder's features would be.
    mu, sd = p["train"].x.mean(0), p["train"].x.std(0)
    std = {k: FeatureSplit((v.x - mu) / sd, v.y, v.groups) for k, v in p.items()}
    kpred, _ = knn_probe(task, std["train"], None, std["test"])
    assert score(kpred, n_boot=0)["auroc"].value > 0.95


def test_knn_votes_are_temperature_weighted():
    task = TaskInfo("toy", "multiclass", ["a", "b", "c"])
    train = FeatureSplit(np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32), np.array([0, 1, 2]), np.arange(3))
    q = np.array([[1.0, 0.05]])
    pred, _ = knn_probe(task, train, None, FeatureSplit(q, np.array([0]), np.array([0])), KNNOptions(k=2,
                                                                                                   temperature=0.1))
    bank = train.x / np.linalg.norm(train.x, axis=1, keepdims=True)
    sims = bank[:2] @ (q[0] / np.linalg.norm(q[0]))
    w = np.exp(sims / 0.1)
    np.testing.assert_allclose(pred.scores[0], [w[0] / w.sum(), w[1] / w.sum(), 0.0], rtol=1e-6)


def test_multilabel_probes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0.3)], axis=1).astype(int)
    task = TaskInfo("findings", "multilabel", ["effusion", "nodule"])
    tr, te = FeatureSplit(x[:200], y[:200], np.arange(200)), FeatureSplit(x[200:], y[200:], np.arange(200, 300))
    for pred in (logistic_probe(task, tr, None, te, LogisticOptions(c_grid=(0.1, 10.0)))[0],
                 mae_linear_probe(task, tr, None, te, MAEProbeOptions(epochs=60, warmup_epochs=6))[0],
                 knn_probe(task, tr, None, te)[0]):
        assert pred.scores.shape == (100, 2)
        assert score(pred, n_boot=0)["auroc_macro"].value > 0.85


def test_missing_class_in_train_is_named(cancer):
    task, p = cancer
    only_benign = p["train"].subset(np.flatnonzero(p["train"].y == 1))
    with pytest.raises(ProtocolError, match="class 'malignant' has no training samples"):
        logistic_probe(task, only_benign, None, p["test"])


def test_few_shot_improves_with_shots(cancer):
    task, p = cancer
    mu, sd = p["train"].x.mean(0), p["train"].x.std(0)
    std = {k: FeatureSplit((v.x - mu) / sd, v.y, v.groups) for k, v in p.items()}
    res = few_shot(task, std["train"], None, std["test"], FewShotOptions(shots=[1, 16], repeats=6), n_boot=200)
    auroc = {r.params["shots"]: r.estimate for r in res.rows if r.metric == "auroc"}
    assert auroc[16].value > auroc[1].value
    # The interval is a patient bootstrap of the test set with the draws nested inside (old code: a Student-t over
    # the 6 draws, labelled n=6, that could leave [0, 1]); it sizes itself by the test set and its patients.
    test = std["test"]
    for est in auroc.values():
        assert 0.0 <= est.low <= est.value <= est.high <= 1.0
        assert (est.n, est.n_groups, est.n_resamples) == (len(test), len(np.unique(test.groups)), 200)
    # Seeded: the same call gives the same draws.
    again = few_shot(task, std["train"], None, std["test"], FewShotOptions(shots=[1], repeats=6), n_boot=200)
    assert [r.estimate.value for r in again.rows] == [r.estimate.value for r in res.rows if r.params["shots"] == 1]


def test_cox_prognosis_on_rossi():
    from lifelines.datasets import load_rossi

    df = load_rossi()
    x = df.drop(columns=["week", "arrest"]).to_numpy(np.float32)
    rng = np.random.default_rng(0)
    split = rng.choice(["train", "test"], size=len(df), p=[0.7, 0.3])
    mk = lambda s: FeatureSplit(x[split == s], df["week"].to_numpy()[split == s],  # noqa: E731
                                np.flatnonzero(split == s), event=df["arrest"].to_numpy()[split == s])
    pred, info = cox_prognosis("rossi", mk("train"), None, mk("test"))
    c = score(pred, n_boot=200)["c_index"]
    assert 0.55 < c.value < 0.85  # published Cox C-index on Rossi is ~0.64
    assert c.low <= c.value <= c.high
    no_events = mk("train")
    no_events.event = np.zeros_like(no_events.event)
    with pytest.raises(ProtocolError, match="no events"):
        cox_prognosis("rossi", no_events, None, mk("test"))


def _fake_text_encoder(vocab):
    """Bag-of-words over a fixed vocabulary: enough to test prompt ensembling without a model."""

    def encode(prompts):
        out = np.zeros((len(prompts), len(vocab)))
        for i, p in enumerate(prompts):
            for w in p.lower().replace(".", "").split():
                if w in vocab:
                    out[i, vocab.index(w)] += 1
        return out

    return encode


def test_zero_shot_single_and_multilabel(tmp_path):
    vocab = ["grey", "white", "matter", "no", "effusion", "scan"]
    enc = _fake_text_encoder(vocab)
    (tmp_path / "p.yaml").write_text("templates: ['a scan of {}.', '{}']\n"
                                     "classes: {grey: [grey matter], white: [white matter]}\n")
    prompts = load_prompts(tmp_path / "p.yaml")
    task = TaskInfo("tissue", "binary", ["grey", "white"])
    emb = np.array([[3, 0, 1, 0, 0, 0], [0, 3, 1, 0, 0, 0], [2, 0.5, 1, 0, 0, 0.0]])
    pred, _ = zero_shot(task, FeatureSplit(emb, np.array([0, 1, 0]), np.arange(3)), prompts, enc)
    assert list(pred.scores > 0.5) == [False, True, False]
    (tmp_path / "f.json").write_text(json.dumps({"findings": {"effusion": {"positive": ["effusion"]}}}))
    ml = load_prompts(tmp_path / "f.json")
    assert ml.findings["effusion"]["negative"] == ["no effusion"]
    mtask = TaskInfo("cxr", "multilabel", ["effusion"])
    emb = np.array([[0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0.2, 0]])
    mpred, _ = zero_shot(mtask, FeatureSplit(emb, np.array([[1], [0]]), np.arange(2)), ml, enc)
    assert mpred.scores[0, 0] > 0.5 > mpred.scores[1, 0]
    (tmp_path / "bad.yaml").write_text("templates: ['no placeholder']\nclasses: {a: [x]}\n")
    with pytest.raises(ProtocolError, match="bad.yaml: templates must"):
        load_prompts(tmp_path / "bad.yaml")
    with pytest.raises(ProtocolError, match="no classes entry for 'csf'"):
        zero_shot(TaskInfo("t", "multiclass", ["grey", "white", "csf"]), FeatureSplit(emb, [0, 1], [0, 1]), prompts,
                  enc)


def _templated(n=112, n_texts=14, dim=16, seed=0):
    """n items with templated captions (n_texts distinct strings), like the demo's mri2d test split."""
    rng = np.random.default_rng(seed)
    strings = [f"caption {i % n_texts}" for i in range(n)]
    caption_emb = rng.normal(size=(n_texts, dim))
    return strings, caption_emb[[i % n_texts for i in range(n)]], rng


@pytest.mark.parametrize("embedding", ["constant", "zero"])
def test_retrieval_of_a_model_that_knows_nothing_is_chance(embedding):
    """Old code counted ties as hits: constant embeddings gave image->text R@1 = 1.0, all-zero ones 1.0 both ways."""
    strings, _, _ = _templated()
    fill = 1.0 if embedding == "constant" else 0.0
    items, texts = np.full((112, 8), fill), np.full((112, 8), fill)
    res = retrieval(items, texts, np.arange(112) // 2, modality="image", ks=(1, 5, 10), n_boot=50, texts=strings)
    got = {(r.metric, r.params["direction"]): r.estimate.value for r in res.rows}
    assert res.info["n_distinct_texts"] == 14
    for k in (1, 5, 10):
        assert got[(f"recall@{k}", "image->text")] == pytest.approx(k / 14)  # k of 14 distinct captions
        # text->image: 8 of the 112 images share the query's caption
        chance = 1 - np.prod([(104 - i) / (112 - i) for i in range(k)])
        assert got[(f"recall@{k}", "text->image")] == pytest.approx(chance)
        assert res.info["chance"][f"image->text recall@{k}"] == pytest.approx(k / 14, abs=1e-4)


def test_retrieval_shuffled_pairs_score_chance_and_a_perfect_model_one():
    strings, emb, rng = _templated()
    perfect = retrieval(emb, emb, np.arange(112), texts=strings, n_boot=0)
    assert all(r.estimate.value == 1.0 for r in perfect.rows)
    r1 = []
    for seed in range(20):  # images matched with a shuffled caption's embedding: no information
        items = emb[np.random.default_rng(seed).permutation(112)] + rng.normal(0, 0.01, emb.shape)
        hits = retrieval_hits(items, emb, ks=(1,), text_keys=strings)
        r1.append(hits["item->text"][1].mean())
    assert np.mean(r1) == pytest.approx(1 / 14, abs=0.02)


def test_retrieval_tie_is_averaged_not_won():
    items = np.repeat(np.eye(4), 3, axis=0)  # 12 images in 4 groups of 3 identical embeddings, distinct texts
    hits = retrieval_hits(items, items.copy(), ks=(1, 3))
    assert hits["text->item"][1] == pytest.approx(np.full(12, 1 / 3))  # own image is one of 3 tied candidates
    assert hits["text->item"][3] == pytest.approx(np.ones(12))


def test_retrieval_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(40, 16))
    owner = np.repeat(np.arange(40), 2)  # two captions per item
    texts = items[owner] + rng.normal(0, 1.2, size=(80, 16))
    hits = retrieval_hits(items, texts, owner, ks=(1, 5))
    a = items / np.linalg.norm(items, axis=1, keepdims=True)
    b = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    sim = a @ b.T
    for k in (1, 5):
        top = np.argsort(-sim, axis=1)[:, :k]
        want_i2t = np.mean([np.any(owner[top[i]] == i) for i in range(40)])
        top_t = np.argsort(-sim.T, axis=1)[:, :k]
        want_t2i = np.mean([owner[j] in top_t[j] for j in range(80)])
        assert hits["item->text"][k].mean() == pytest.approx(want_i2t)
        assert hits["text->item"][k].mean() == pytest.approx(want_t2i)
    res = retrieval(items, texts, np.arange(40), owner, modality="image", n_boot=50)
    dirs = {(r.metric, r.params["direction"]) for r in res.rows}
    assert ("recall@10", "image->text") in dirs and ("recall@1", "text->image") in dirs
    perfect = retrieval(items, items, np.arange(40), n_boot=0)
    assert all(r.estimate.value == 1.0 for r in perfect.rows)


def test_generation_metrics():
    refs = ["the cat is on the mat", "there is a small left pleural effusion. no pneumothorax."]
    assert corpus_bleu(refs, refs) == pytest.approx(1.0)
    # Papineni's example-style check by hand: unigram-only overlap -> BLEU-4 = 0 without smoothing.
    assert corpus_bleu(["a b c d"], ["d c b a"]) == 0.0
    # ROUGE-L: LCS("police killed the gunman", "police kill the gunman") = 3 -> P=R=3/4.
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    lab = KeywordLabeller({"effusion": ["pleural effusion", "effusion"], "pneumothorax": ["pneumothorax"]})
    np.testing.assert_array_equal(lab.label(refs[1]), [1, 0])
    np.testing.assert_array_equal(lab.label("No effusion. Small pneumothorax"), [0, 1])
    res = generation_metrics(refs * 5, refs * 5, np.arange(10), lab, n_boot=20)
    vals = {r.metric: r.estimate.value for r in res.rows}
    assert vals["bleu4"] == pytest.approx(1.0) and vals["rouge_l"] == 1.0 and vals["finding_f1_micro"] == 1.0
