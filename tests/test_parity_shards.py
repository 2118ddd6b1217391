"""medfm's artefacts read by the field's own tools: shards by plain ``webdataset.WebDataset`` and GNU ``tar``, and a
ZeRO-3 checkpoint consolidated by medfm equal to DeepSpeed's own ``zero_to_fp32`` script run on it."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import webdataset as wds
from peers.parity_env import PEERS_DIR, run_script
from safetensors.torch import load_file

from medfm.shards.manifest import load_manifest, shard_paths
from medfm.shards.sample import Sample, encode_sample, make_meta
from medfm.shards.writer import DatasetWriter


def _samples() -> list[Sample]:
    """Seven samples covering every modality and mixes of them; the volume is a real MR (nibabel's anatomical)."""
    rng = np.random.default_rng(0)
    anat = np.asanyarray(nib.load(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii").dataobj)
    volume = np.ascontiguousarray(anat.transpose(2, 1, 0)).astype(np.int16)
    out = []
    for i in range(7):
        kw = {}
        if i % 2 == 0:
            kw["image"] = rng.integers(0, 256, (24, 20, 3 if i % 4 == 0 else 1), dtype=np.uint8)
        if i in (1, 4):
            kw["volume"] = volume
        if i in (2, 5, 6):
            kw["signal"] = rng.standard_normal((3, 500)).astype(np.float32)
        if i in (3, 6):
            ehr = np.zeros((5, 4), np.float32)
            ehr[:, 0] = -np.arange(5)[::-1]
            ehr[:, 1] = rng.integers(2, 9, 5)
            ehr[:, 2] = rng.standard_normal(5)
            ehr[:, 3] = 1
            kw["ehr"] = ehr
        text = f"report {i}: no acute findings. ünïcode ✓" if i != 3 else None
        blocks = {}
        if "image" in kw:
            c = kw["image"].shape[2]
            blocks["image"] = {"photometric": "RGB" if c == 3 else "MONOCHROME2", "bits": 8,
                               "shape": list(kw["image"].shape)}
        if "volume" in kw:
            blocks["volume"] = {"spacing": [2.0, 2.0, 2.0], "orientation": "RAS", "units": "HU",
                                "shape": list(volume.shape)}
        if "signal" in kw:
            blocks["signal"] = {"fs": 100.0, "leads": ["I", "II", "III"], "units": ["mV"] * 3}
        if "ehr" in kw:
            blocks["ehr"] = {"vocab": "ehr", "static": {}}
        meta = make_meta(patient_id=f"p{i // 2:03d}", study_id=f"s{i:03d}", split="train" if i < 5 else "val",
                         source={"format": "synthetic", "file": f"h{i}"}, labels={"y": i % 2}, **blocks)
        out.append(Sample(key=f"s{i:03d}-0", meta=meta, text=text, **kw))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    samples = _samples()
    out = tmp_path_factory.mktemp("shards")
    with DatasetWriter(out, max_samples=3) as w:
        for s in samples:
            w.add(s)
    expected = {s.key: {k: v for k, v in encode_sample(s).items() if k != "__key__"} for s in samples}
    return out, expected


def test_plain_webdataset_reads_every_member(dataset):
    out, expected = dataset
    urls = [str(p) for p in shard_paths(out)]
    assert len(urls) == 3  # 7 samples, 3 per shard
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        seen[sample["__key__"]] = members
    assert set(seen) == set(expected)
    for key, members in seen.items():
        assert set(members) == set(expected[key]), f"{key}: members differ"
        for name, data in members.items():
            assert data == expected[key][name], f"{key}.{name}: bytes differ"
            if name.endswith(".npy"):
                arr = np.load(io.BytesIO(data), allow_pickle=False)  # plain numpy, no pickle
                assert arr.size > 0
        meta = json.loads(members["meta.json"])
        assert meta["modalities"] and meta["study_id"] == key.split("-")[0]
    # webdataset's own decoder on the same shards: npy/json/txt handlers give arrays, dicts, str.
    decoded = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(decoded) == 7
    vol = next(d for d in decoded if "volume.npy" in d)["volume.npy"]
    assert vol.dtype == np.int16 and vol.shape == (25, 41, 33)
    assert all(isinstance(d["meta.json"], dict) for d in decoded)


def test_gnu_tar_lists_and_extracts_every_member(dataset, tmp_path):
    out, expected = dataset
    tar = shutil.which("tar")
    assert tar, "GNU tar is not on PATH"
    manifest = load_manifest(out)
    names = set()
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        listing = subprocess.run([tar, "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
        assert len(listing) == len(set(listing)), f"{shard['name']}: duplicate member names"
        names.update(listing)
        subprocess.run([tar, "-xf", str(path), "-C", str(tmp_path)], check=True)
    want = {f"{k}.{m}" for k, members in expected.items() for m in members}
    assert names == want
    for k, members in expected.items():
        for m, data in members.items():
            assert (tmp_path / f"{k}.{m}").read_bytes() == data


@pytest.mark.slow
def test_consolidation_equals_deepspeed_zero_to_fp32_script(tmp_path):
    from medfm.pretrain.checkpoint import consolidate

    run_script(sys.executable, PEERS_DIR / "zero3_checkpoint.py", [tmp_path], nproc=2, timeout=300)
    root = tmp_path / "ckpt"
    ours = consolidate(root, tag="step3")
    script_out = tmp_path / "ds_fp32"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(root), str(script_out),
                           "--safe_serialization", "-t", "step3"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(script_out.glob("*.safetensors"))
    assert files, f"zero_to_fp32 wrote no safetensors into {script_out}: {sorted(script_out.iterdir())}"
    theirs = {}
    for f in files:
        theirs.update(load_file(str(f)))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == torch.float32 and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), f"{k}: medfm consolidation != DeepSpeed zero_to_fp32"
    # Both equal the weights gathered inside the live engine (so neither side is, e.g., the initial weights).
    gathered = load_file(str(tmp_path / "gathered.safetensors"))
    for k, v in gathered.items():
        assert torch.equal(ours[k], v), f"{k}: consolidated != gathered live weights"
    assert ours["logit_scale"].shape == (1,)
