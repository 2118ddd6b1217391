"""model.init_from / model.towers.<m>.init_from: every source kind, one-line key reports, shape errors naming the
key, and (slow, 2 CPU ranks, ZeRO-3 under deepspeed.zero.Init, persistence threshold 0) the MiniLM text tower filled
from its package equals AutoModel.from_pretrained, and a zoo release continued under ZeRO-3 starts from exactly its
released weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config, tower_specs  # noqa: E402

from medfm.model_zoo import build_multimodal  # noqa: E402
from medfm.model_zoo.init_from import InitFromError, apply_init_from, load_into, open_source  # noqa: E402
from medfm.model_zoo.multimodal import MultiModalConfig  # noqa: E402
from medfm.pretrain.world_env import env_outside_world  # noqa: E402
from medfm.schema import from_dict  # noqa: E402

HELPER = str(Path(__file__).parent / "init_from_helpers.py")


def _model_cfg(mods=("image", "text"), **extra) -> MultiModalConfig:
    return from_dict(MultiModalConfig, {"towers": tower_specs(mods), "embed_dim": 16, **extra}, "model")


def _build(seed: int, **extra):
    torch.manual_seed(seed)
    return build_multimodal(_model_cfg(**extra))


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)



def _bytes_tokenizer(model) -> dict:
    """The tokenizer spec a release of these tiny byte-vocabulary models records (what their training used)."""
    from medfm.model_zoo.tokenizers import tokenizer_spec

    return tokenizer_spec(model.towers["text"], "bytes", 16)

def test_whole_model_from_safetensors_and_checkpoint_style_prefix(tmp_path):
    src = _build(1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "bare.safetensors"))
    save_file({"model." + k: v for k, v in sd.items()} | {"objectives.0.w": torch.ones(1)},
              str(tmp_path / "pretrain.safetensors"))
    for f in ("bare", "pretrain"):
        dst = _build(2)
        lines = []
        [rep] = apply_init_from(dst, _model_cfg(init_from=str(tmp_path / f"{f}.safetensors")), log=lines.append)
        params = [n for n, _ in dst.named_parameters()]
        assert _same(dst.state_dict(), sd, params) and rep.missing == [] and rep.unexpected == []
        assert len(lines) == 1 and "missing 0" in lines[0] and "unexpected 0" in lines[0]


def test_whole_model_from_a_release_with_tied_weights(tmp_path):
    from medfm.model_zoo.zoo import Zoo

    cap = {"caption": {"enabled": True, "width": 16, "depth": 1, "num_heads": 2, "max_len": 16}}
    src = _build(8, **cap)
    dest = Zoo(tmp_path / "zoo").publish(src, "cap:1", card="test", tokenizer=_bytes_tokenizer(src))
    assert json.loads((dest / "config.json").read_text())["weights"]["tied"]  # the case under test
    dst = _build(9, **cap)
    [rep] = apply_init_from(dst, _model_cfg(init_from=str(dest), **cap))
    assert rep.missing == [] and rep.unexpected == []
    assert _same(dst.state_dict(), src.state_dict(), list(src.state_dict()))


def test_tower_from_release_name_version_and_hf_directory(tmp_path):
    from medfm.model_zoo.zoo import Zoo

    src = _build(3)
    Zoo(tmp_path / "zoo").publish(src, "toy:1.0", card="test", tokenizer=_bytes_tokenizer(src))
    dst = _build(4)
    cfg = _model_cfg()
    cfg.towers["text"].init_from = "toy:1.0"
    [rep] = apply_init_from(dst, cfg, zoo=tmp_path / "zoo")
    text = [n for n, _ in dst.towers["text"].named_parameters()]
    assert rep.target == "towers.text" and rep.missing == [] and rep.unexpected == []
    assert _same(dst.towers["text"].state_dict(), src.towers["text"].state_dict(), text)
    image = [n for n, _ in dst.towers["image"].named_parameters()]
    assert not _same(dst.towers["image"].state_dict(), src.towers["image"].state_dict(), image)  # untouched
    # the release's text/ directory is a plain HF directory: a tower from it directly
    dst2 = _build(5)
    load_into(dst2.towers["text"], open_source(str(tmp_path / "zoo" / "toy" / "1.0" / "text")), "towers.text")
    assert _same(dst2.towers["text"].state_dict(), src.towers["text"].state_dict(), text)


def test_missing_unexpected_one_line_and_shape_mismatch_names_the_key(tmp_path):
    src = _build(6)
    sd = {k: v.contiguous() for k, v in src.towers["image"].state_dict().items()}
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "image.safetensors"))
    lines = []
    rep = load_into(_build(7).towers["image"], open_source(str(tmp_path / "image.safetensors")), "towers.image",
                    log=lines.append)
    assert rep.missing == ["norm.weight"] and rep.unexpected == ["extra.weight"]
    assert len(lines) == 1 and "missing 1 ['norm.weight']" in lines[0] and "unexpected 1 ['extra.weight']" in lines[0]
    sd = {k: v.contiguous() for k, v in src.towers["image"].state_dict().items()}
    sd["cls_token"] = torch.zeros(1, 3, 32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InitFromError, match=r"tensor 'cls_token' has shape \[1, 3, 32\]") as exc:
        load_into(_build(7).towers["image"], open_source(str(tmp_path / "bad.safetensors")), "towers.image")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("spec, message", [("nope/missing.safetensors", "no such file"),
                                           ("pkg:no_such_package_xyz/model", "not installed"),
                                           ("unknown-model:1.0", "no model 'unknown-model'")])
def test_missing_sources_are_one_line(tmp_path, spec, message):
    with pytest.raises(InitFromError, match=message) as exc:
        open_source(spec, zoo=tmp_path / "zoo")
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_zero3_minilm_from_package_and_release_continued_exactly(tmp_path):
    from medfm.model_zoo import load
    from medfm.model_zoo.checkpoint_io import consolidate, model_state_dict
    from medfm.model_zoo.zoo import Zoo

    shards = make_shards(tmp_path / "shards", n=8, modalities=("image", "text"))
    objectives = [{"name": "contrastive:image-text"}]
    minilm = run_config(tmp_path / "minilm", shards, objectives, ("image", "text"),
                        zero={"zero_init": True, "stage3_param_persistence_threshold": 0})
    minilm["model"]["towers"]["text"] = {"arch": "text_minilm"}
    # the release: a tiny model of the same architecture with other weights (seed 11)
    released = run_config(tmp_path / "release_run", shards, objectives, ("image", "text"),
                          zero={"zero_init": True, "stage3_param_persistence_threshold": 0})
    torch.manual_seed(11)
    model = build_multimodal(from_dict(MultiModalConfig, released["model"], "model"))
    Zoo(tmp_path / "zoo").publish(model, "toy:2.0", card="test", tokenizer=_bytes_tokenizer(model))
    released["model"]["init_from"] = "toy:2.0"
    spec = {"minilm": minilm, "release": released, "out": str(tmp_path / "report")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**env_outside_world(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MEDFM_ZOO": str(tmp_path / "zoo")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HELPER,
           str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "pretrained weights cannot be loaded" not in proc.stderr
    for r in range(2):
        rep = json.loads((tmp_path / f"report.rank{r}.json").read_text())
        assert rep["minilm_partitioned"], rep
        assert 0.45 <= rep["minilm_local_numel"] / rep["minilm_full_numel"] <= 0.55, rep  # really partitioned
        assert rep["minilm_weights_compared"] > 90 and rep["minilm_weight_max_diff"] == 0.0, rep
        assert rep["minilm_max_diff"] < 1e-5, rep
    release = load(str(tmp_path / "zoo" / "toy" / "2.0"))
    release = release[0] if isinstance(release, tuple) else release
    step0 = model_state_dict(consolidate(tmp_path / "release_run" / "checkpoints", "step0"))
    live = release.state_dict()
    params = [n for n, _ in release.named_parameters()]
    assert set(params) <= set(step0)
    diffs = {k: float((step0[k] - live[k].float()).abs().max()) for k in params}
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
