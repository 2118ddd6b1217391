"""`medfm release` / `medfm zoo` / `medfm.model_zoo.load("NAME:V")`: a real (world-of-one, DDP) training checkpoint is
consolidated, published with a model card of recorded facts, listed, loaded back bit-exact, protected against
re-release without --force, and refused once its checksums no longer match."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config, write_cls_suite  # noqa: E402

from medfm.launch.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.train import run
    from medfm.schema import from_dict

    root = tmp_path_factory.mktemp("release")
    shards = make_shards(root / "shards", n=16, modalities=("image", "text"))
    cfg = run_config(root / "run", shards, [{"name": "mae:image"}, {"name": "contrastive:image-text"}],
                     ("image", "text"), steps=3, train={"strategy": "ddp"}, checkpoint={"every": 0, "final": True},
                     release={"licence": "CC-BY-4.0", "intended_use": "unit tests only"})
    res = run(from_dict(RunConfig, cfg))
    assert res.status == "finished"
    report = root / "report.json"
    report.write_text(json.dumps({"source": "test", "results": [
        {"task": "toy", "protocol": "logistic", "metric": "auroc", "value": 0.75, "ci": [0.6, 0.9], "n": 40}]}))
    return root, shards, report


def test_release_card_zoo_and_load_round_trip(trained, capsys):
    from medfm.model_zoo import load
    from medfm.model_zoo.checkpoint_io import consolidate, model_state_dict

    root, shards, report = trained
    zoo = root / "zoo"
    assert main(["release", str(root / "run"), "--name", "toy", "--version", "1.0", "--zoo", str(zoo),
                 "--eval", str(report)]) == 0
    card = (zoo / "toy" / "1.0" / "README.md").read_text()
    model = load("toy:1.0", zoo=zoo)
    model = model[0] if isinstance(model, tuple) else model
    n_params = sum(p.numel() for p in model.parameters())
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    for fact in (f"{n_params:,}", "CC-BY-4.0", "unit tests only", "| toy | logistic | auroc | 0.7500 | [0.600, 0.900]",
                 f"samples {manifest['totals']['samples']}", "Optimizer steps: 3", "strategy: ddp",
                 "| image | vit2d_tiny_p16 ", f"de-identification: {'APPLIED' if manifest['deid']['applied'] else 'NOT'}"):
        assert fact in card, fact
    # the released weights are the checkpoint's, bit for bit
    ckpt = model_state_dict(consolidate(root / "run" / "checkpoints"))
    live = model.state_dict()
    for k, v in ckpt.items():
        assert torch.equal(live[k], v), k
    assert main(["zoo", "list", "--zoo", str(zoo)]) == 0
    assert "toy" in capsys.readouterr().out


def test_rerelease_needs_force_and_tampering_is_refused(trained, capsys):
    from medfm.model_zoo import load

    root, _, _ = trained
    zoo = root / "zoo2"
    args = ["release", str(root / "run"), "--name", "toy", "--version", "2.0", "--zoo", str(zoo)]
    assert main(args) == 0
    assert "no evaluation report" in (zoo / "toy" / "2.0" / "README.md").read_text().lower()
    assert main(args) == 2
    assert "already in the zoo" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    weights = zoo / "toy" / "2.0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum|sha256|mismatch"):
        load("toy:2.0", zoo=zoo)


def test_release_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    root, _, _ = trained
    assert main(["release", str(tmp_path / "nope"), "--name", "x", "--version", "1", "--zoo", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["release", str(root / "run"), "--name", "x", "--version", "1", "--zoo", str(tmp_path),
                 "--eval", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


CAPTIONS = ["axial T1 brain slice, grey matter", "sagittal T2 slice of the cerebellum", "white matter, coronal"]


def test_released_text_tower_tokenizes_as_trained(trained):
    """A bytes-trained text tower's release carries its tokenizer: captions get distinct ids (the byte ids training
    used) and distinct embeddings, via the same path medfm eval takes (old code: a 5-id tokenizer rebuilt from a
    bare config.json gave every caption [2, 1, ..., 3] and one constant embedding)."""
    import numpy as np

    from medfm.evals.features import load_model, text_encoder, text_tokenizer
    from medfm.shards.collate import ByteTokenizer

    root, _, _ = trained
    zoo = root / "zoo-tok"
    assert main(["release", str(root / "run"), "--name", "toy", "--version", "1.0", "--zoo", str(zoo)]) == 0
    meta = json.loads((zoo / "toy" / "1.0" / "config.json").read_text())
    assert meta["tokenizer"] == {"kind": "bytes", "vocab_size": 259, "max_tokens": 16}
    model, _, kind = load_model(zoo / "toy" / "1.0")
    assert kind == "release"
    ids, valid = text_tokenizer(model)(CAPTIONS)
    want, want_valid = ByteTokenizer(16)(CAPTIONS)
    assert torch.equal(ids, want) and torch.equal(valid, want_valid)
    assert len({tuple(r[v].tolist()) for r, v in zip(ids, valid)}) == len(CAPTIONS)
    emb = text_encoder(model)(CAPTIONS)
    assert np.ptp(emb, axis=0).max() > 1e-3  # not one constant vector
    # the checkpoint itself decides the same way (its saved run config)
    ckpt_model, _, _ = load_model(root / "run")
    assert ckpt_model.text_tokenizer_spec == model.text_tokenizer_spec
    np.testing.assert_allclose(text_encoder(ckpt_model)(CAPTIONS), emb, atol=1e-6)


def test_release_without_a_reconstructible_tokenizer_is_refused(trained, tmp_path):
    """A text tower whose release records no tokenizer and stores no tokenizer files cannot be evaluated honestly."""
    from medfm.model_zoo import load
    from medfm.model_zoo.release import ReleaseError, _write_checksums

    root, _, _ = trained
    zoo = tmp_path / "zoo"
    assert main(["release", str(root / "run"), "--name", "toy", "--version", "1.0", "--zoo", str(zoo)]) == 0
    rel = zoo / "toy" / "1.0"
    meta = json.loads((rel / "config.json").read_text())
    del meta["tokenizer"]  # as releases were written before the spec existed
    (rel / "config.json").write_text(json.dumps(meta))
    _write_checksums(rel)
    with pytest.raises(ReleaseError, match="tokenizer cannot be reconstructed"):
        load(rel)


def test_the_release_reproduces_its_card(trained, tmp_path):
    """Evaluate the checkpoint, release it with that report as its card, evaluate the release with `medfm eval`:
    the zero-shot and retrieval rows (same suite, same seed) are the card's, to the printed digit and exactly in
    report.json. Old code re-read the release's text with another tokenizer, so its text numbers were not the card's."""
    from medfm.launch.release import _eval_table

    root, shards, _ = trained
    suite = write_cls_suite(tmp_path / "suite.yaml", shards, "repro", 50)
    assert main(["eval", str(root / "run"), "--suite", str(suite), "--out", str(tmp_path / "ev_ckpt")]) == 0
    zoo = tmp_path / "zoo"
    assert main(["release", str(root / "run"), "--name", "repro", "--version", "1", "--zoo", str(zoo),
                 "--eval", str(tmp_path / "ev_ckpt" / "report.json")]) == 0
    rel = zoo / "repro" / "1"
    assert main(["eval", str(rel), "--suite", str(suite), "--out", str(tmp_path / "ev_rel")]) == 0
    card = (rel / "README.md").read_text()
    before = json.loads((tmp_path / "ev_ckpt" / "report.json").read_text())
    again = json.loads((tmp_path / "ev_rel" / "report.json").read_text())
    rows = [ln for ln in _eval_table(again) if ln.startswith(("| cls_zeroshot", "| pairs_retrieval"))]
    assert len(rows) == len(again["results"]) >= 6  # zero-shot metrics + R@1, R@5 both ways
    missing = [ln for ln in rows if ln not in card]
    assert not missing, f"release rows not on its card: {missing}"
    key = ("task", "metric", "params")
    got = {json.dumps([r[k] for k in key]): (r["value"], r["ci"]) for r in again["results"]}
    want = {json.dumps([r[k] for k in key]): (r["value"], r["ci"]) for r in before["results"]}
    assert got == want
    retrieval_info = next(t["info"] for t in again["tasks"] if t["task"] == "pairs_retrieval")
    assert retrieval_info["n_distinct_texts"] == 4


def test_pretraining_writes_the_mae_reconstruction_png(trained):
    """The run directory holds input / masked / reconstruction for its image MAE objective (written by every rank's
    forwards, rank 0's PNG) — what people check first of an MAE run."""
    from PIL import Image

    root, _, _ = trained
    png = root / "run" / "mae_image.png"
    assert png.is_file()
    w, h = Image.open(png).size
    assert w > 300 and h > 300


def test_grouped_spellings_consolidate_and_release(trained, tmp_path):
    """`medfm pretrain consolidate` (written atomically: nothing but the output under --out's folder) and
    `medfm zoo release`, the verbs grouped by part, do what `pretrain-consolidate` / `release` did."""
    from safetensors.torch import load_file

    from medfm.model_zoo.checkpoint_io import consolidate, model_state_dict

    root, _, _ = trained
    out = tmp_path / "m.safetensors"
    assert main(["pretrain", "consolidate", str(root / "run"), "--out", str(out)]) == 0
    want = model_state_dict(consolidate(root / "run" / "checkpoints", None))
    got = load_file(str(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    zoo = tmp_path / "zoo"
    assert main(["zoo", "release", str(root / "run"), "--name", "grouped", "--version", "1", "--zoo", str(zoo)]) == 0
    assert main(["zoo", "verify", "grouped:1", "--zoo", str(zoo)]) == 0
