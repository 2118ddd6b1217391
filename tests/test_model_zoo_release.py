"""Release format: bit-exact save->load, sharding, corruption naming the tensor, HF interop, zoo index."""

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from medfm.model_zoo import build_multimodal, load, tiny_config  # noqa: E402
from medfm.model_zoo.release import ReleaseError, save_release, verify_release  # noqa: E402
from medfm.model_zoo.zoo import Zoo  # noqa: E402

B = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_multimodal(tiny_config(("image", "signal", "text"), n_leads=3, signal_len=100)).eval()
    with torch.no_grad():  # make every tensor distinct from its init so the round trip proves something
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


@pytest.fixture(scope="module")
def release(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "tiny"
    card = {"title": "tiny test model", "intended_use": "tests only", "evals": {"auroc": "0.5 [0.4, 0.6]"}}
    return save_release(out, model, card=card, preprocessing={"image": {"mean": 0.5, "std": 0.25}})


def _batch():
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(B, 1, 32, 32, generator=g),
        "signal": torch.randn(B, 3, 100, generator=g),
        "signal_valid": torch.ones(B, 100, dtype=torch.bool),
        "text_ids": torch.tensor([[101, 2053, 11325, 102], [101, 2235, 102, 0]]),
        "text_valid": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
    }


def test_layout_and_no_pickle(release):
    files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    for required in ("config.json", "model.safetensors", "README.md", "checksums.sha256", "text/config.json",
                     "text/model.safetensors", "text/tokenizer_config.json"):
        assert required in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    card = (release / "README.md").read_text()
    assert "# tiny test model" in card and "| auroc | 0.5 [0.4, 0.6] |" in card
    assert verify_release(release) == []


def test_round_trip_is_bit_exact(model, release):
    loaded = load(release).eval()
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert loaded.caption_decoder.lm_head.weight is loaded.caption_decoder.token_embed.weight  # tie restored
    batch = _batch()
    with torch.no_grad():
        for m in ("image", "signal", "text"):
            assert torch.equal(model.embed(m, batch), loaded.embed(m, batch))
    assert loaded.release_info["preprocessing"]["image"]["std"] == 0.25
    assert loaded.towers["text"].tokenize(["ok"])["text_ids"].shape[0] == 1


def test_sharded_round_trip(model, tmp_path):
    out = save_release(tmp_path / "sharded", model, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    loaded = load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_existing_release_is_not_clobbered(model, release):
    before = (release / "checksums.sha256").read_text()
    with pytest.raises(ReleaseError, match="already exists"):
        save_release(release, model)
    assert (release / "checksums.sha256").read_text() == before


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_tensor_is_named(release, tmp_path):
    bad = _copy(release, tmp_path / "bad")
    meta = json.loads((bad / "config.json").read_text())
    name = "towers.image.patch_embed.proj.weight"
    header_len = int.from_bytes((bad / "model.safetensors").read_bytes()[:8], "little")
    offsets = json.loads((bad / "model.safetensors").read_bytes()[8 : 8 + header_len])[name]["data_offsets"]
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8 + header_len + offsets[0] + 5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert meta["weights"]["tensors"][name]["file"] == "model.safetensors"
    with pytest.raises(ReleaseError, match=f"tensor '{name}' in model.safetensors is corrupted"):
        load(bad)


def test_truncated_file_and_missing_file(release, tmp_path):
    bad = _copy(release, tmp_path / "trunc")
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReleaseError, match="model.safetensors"):
        load(bad)
    gone = _copy(release, tmp_path / "gone")
    (gone / "text" / "model.safetensors").unlink()
    with pytest.raises(ReleaseError, match="text/model.safetensors: missing"):
        load(gone)


def test_architecture_mismatch_names_the_tensor(release, tmp_path):
    bad = _copy(release, tmp_path / "mismatch")
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["towers"]["image"]["overrides"]["width"] = 32
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="config.json: checksum mismatch"):
        load(bad)
    with pytest.raises(ReleaseError, match=r"tensor '[\w.]+image[\w.]*' has shape"):
        load(bad, verify=False)


def test_text_tower_loads_with_transformers(model, release):
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(release / "text").eval()
    tok = AutoTokenizer.from_pretrained(release / "text")
    enc = tok(["no acute findings"], return_tensors="pt")
    with torch.no_grad():
        ours = model.towers["text"](enc["input_ids"], enc["attention_mask"])
        theirs = hf(**enc).last_hidden_state
    torch.testing.assert_close(ours, theirs)


def test_zoo_index(model, release, tmp_path):
    zoo = Zoo(tmp_path / "zoo")
    zoo.add(release, "chest-tiny:0.9")
    zoo.publish(model, "chest-tiny:1.0", card="# v1\n", summary="first")
    zoo.publish(model, "chest-tiny:0.10", card="# v0.10\n")
    assert zoo.resolve("chest-tiny").name == "1.0"  # latest by version order, not text order
    assert zoo.resolve("chest-tiny:0.10").name == "0.10"
    assert [r["version"] for r in zoo.list()] == ["0.9", "0.10", "1.0"]
    with pytest.raises(ReleaseError, match="already exists"):
        zoo.publish(model, "chest-tiny:1.0")
    zoo.publish(model, "chest-tiny:1.0", card="# v1 again\n", force=True)
    shown = zoo.show("chest-tiny:1.0")
    assert shown["card"] == "# v1 again\n" and shown["config"]["format"] == "medfm-release"
    loaded = load("chest-tiny:1.0", zoo=tmp_path / "zoo")
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    with pytest.raises(ReleaseError, match="no model 'nope'"):
        zoo.resolve("nope")
    with pytest.raises(ReleaseError, match="no version '2.0'"):
        zoo.resolve("chest-tiny:2.0")
    with pytest.raises(ReleaseError, match="NAME"):
        zoo.resolve("bad name")


def test_zoo_cli(model, tmp_path, capsys):
    from medfm.launch.cli import main

    zoo = tmp_path / "clizoo"
    Zoo(zoo).publish(model, "ecg-tiny:1.0", card="# ECG tiny\nintended use: tests\n", summary="cli test")
    assert main(["zoo", "list", "--zoo", str(zoo)]) == 0
    assert "ecg-tiny" in capsys.readouterr().out
    assert main(["zoo", "show", "ecg-tiny", "--zoo", str(zoo)]) == 0
    assert "intended use: tests" in capsys.readouterr().out
    assert main(["zoo", "verify", "ecg-tiny:1.0", "--zoo", str(zoo)]) == 0
    assert main(["zoo", "show", "nope", "--zoo", str(zoo)]) == 2
    (zoo / "ecg-tiny" / "1.0" / "README.md").write_text("tampered\n")
    assert main(["zoo", "verify", "ecg-tiny:1.0", "--zoo", str(zoo)]) == 1


def test_hf_tokenizer_travels_pinned_by_hash(release, tmp_path):
    """A Hugging Face tokenizer is stored in the release byte for byte with its sha256 in config.json; a changed
    tokenizer file is refused (ids would silently differ from training), and the loaded model tokenises with it."""
    import json
    import shutil

    from medfm.model_zoo.release import _write_checksums
    from medfm.model_zoo.tokenizers import build_tokenizer

    meta = json.loads((release / "config.json").read_text())
    spec = meta["tokenizer"]
    assert spec["kind"] == "hf" and spec["dir"] == "text" and "tokenizer.json" in spec["files"]
    model = load(release)
    ids, valid = build_tokenizer(model.text_tokenizer_spec)(["no acute findings"])
    assert ids[0, 0].item() == 101 and valid.all()  # [CLS] of the MiniLM vocabulary, not a 5-id rebuild
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    vocab = bad / "text" / "vocab.txt"
    vocab.write_text(vocab.read_text() + "tampered\n")
    _write_checksums(bad)  # checksums alone would not catch a re-signed release; the spec's hash does
    with pytest.raises(ReleaseError, match="does not match its recorded sha256"):
        load(bad)
