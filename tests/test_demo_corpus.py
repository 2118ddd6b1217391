"""The demo corpus (medfm.demo.corpus) and the ingest features it relies on (index rows naming NIfTI / WFDB
files, fixed-range MR normalisation). One module-scoped build of the whole corpus (~15 s of CPU)."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
from conftest import require_real

from medfm.schema import ConfigError
from medfm.shards import realdata
from medfm.shards.deid import DeidConfig
from medfm.shards.ingest import IngestConfig, build
from medfm.shards.manifest import SPLITS, load_manifest, shard_paths
from medfm.shards.preprocess import VolumePreprocess, preprocess_volume
from medfm.shards.sample import decode_sample
from medfm.shards.verify import iter_tar_samples, verify

needs_real = pytest.mark.usefixtures("demo_real_data")  # fails, never skips, without the demo extra
SALT = "test-demo-corpus-salt"


def _samples(shard_dir):
    for path in shard_paths(shard_dir, load_manifest(shard_dir)):
        for members in iter_tar_samples(path):
            yield decode_sample(members)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from medfm.demo.corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo")
    logs: list[str] = []
    summary = build_demo_corpus(out, salt=SALT, workers=2, progress=False, log=logs.append)
    return out, summary, logs


@needs_real
def test_every_dataset_verifies_and_has_its_modalities(corpus):
    out, summary, logs = corpus
    from medfm.demo.corpus import DATASETS

    assert set(summary["datasets"]) == set(DATASETS) and summary["reused"] == []
    expect = {"real": {"volume", "image", "signal", "ehr"}, "mri2d": {"image", "text"},
              "mri3d": {"volume", "text"}, "ecg": {"signal", "text"}, "ehr": {"ehr"}}
    for ds, path in summary["datasets"].items():
        problems, stats = verify(path)
        assert problems == [], (ds, [str(p) for p in problems[:5]])
        manifest = load_manifest(path)
        assert manifest["deid"]["applied"] and not manifest["identifiable"]
        assert manifest["skipped"] == {}, (ds, manifest["skipped"])
        assert {m for m, n in manifest["totals"]["modalities"].items() if n} == expect[ds]
        assert summary["counts"][ds]["samples"] == manifest["totals"]["samples"]
    counts = summary["counts"]
    assert counts["mri2d"]["samples"] >= 300 and counts["mri3d"]["samples"] >= 200
    assert counts["ecg"]["samples"] >= 200 and counts["ehr"]["samples"] == 569
    # every genuine file made it: CT + MR + enhanced CT/MR + 3 MR series + 2 NIfTI = volumes; RG1 = the image;
    # DICOM ECG + EDF + MIT-BIH = signals; lifelines' 103 subjects = EHR
    real = counts["real"]["modalities"]
    assert real["image"] == 1 and real["signal"] == 3 and real["ehr"] == 103 and real["volume"] >= 7
    assert json.loads((out / "corpus.json").read_text())["complete"] is True


@needs_real
def test_labels_balanced_and_every_class_in_every_split(corpus):
    _, summary, _ = corpus
    for name, task in summary["tasks"].items():
        per_split = summary["counts"][task["dataset"]]["labels"][task["label"]]
        for split in SPLITS:
            counts = per_split[split]
            total = sum(counts.values())
            assert total > 0, (name, split)
            assert list(counts) == task["classes"], (name, split, counts)
            assert min(counts.values()) >= 0.1 * total, (name, split, counts)


@needs_real
def test_splits_are_patient_disjoint_and_cells_agree_across_families(corpus):
    _, summary, _ = corpus
    split_of_patient: dict[str, set] = defaultdict(set)
    for ds in ("mri2d", "mri3d", "ecg", "ehr"):
        label = {"mri2d": "tissue", "mri3d": "tissue", "ecg": "rhythm", "ehr": "malignant"}[ds]
        seen = Counter()
        for s in _samples(summary["datasets"][ds]):
            split_of_patient[s.meta["patient_id"]].add(s.meta["split"])
            assert label in s.meta["labels"]
            seen[s.meta["split"]] += 1
        assert all(seen[sp] > 0 for sp in SPLITS), (ds, seen)
    # one split per patient; mri2d and mri3d share the cell pseudonyms, so this also checks they agree
    assert all(len(v) == 1 for v in split_of_patient.values())


@needs_real
def test_captions_follow_labels_and_ehr_label_does_not_leak(corpus):
    _, summary, _ = corpus
    tasks = summary["tasks"]
    for name in ("mri2d_tissue", "mri3d_tissue", "ecg_rhythm", "ecg_rate"):
        t = tasks[name]
        for s in list(_samples(summary["datasets"][t["dataset"]]))[:80]:
            cls = t["classes"][s.meta["labels"][t["label"]]]
            assert s.text.startswith(t["prompts"][cls]) or t["prompts"][cls].split(", ")[-1] in s.text, (name, s.text)
            others = [c for c in t["classes"] if c != cls]
            assert not any(f"mostly {o}" in s.text or f", {o} rhythm" in s.text or f"rate {o}" in s.text
                           for o in others)
    vocab = load_manifest(summary["datasets"]["ehr"])["vocabularies"]["ehr"]
    assert "malignant" not in vocab and len(vocab) == 2 + 30
    s = next(_samples(summary["datasets"]["ehr"]))
    assert s.ehr.shape == (30, 4) and s.meta["labels"]["malignant"] in (0, 1) and s.text is None


@needs_real
def test_volume_blocks_keep_template_values_and_geometry(corpus):
    out, summary, _ = corpus
    import nibabel as nib
    import pandas as pd

    from medfm.shards.volume import to_canonical

    idx = pd.read_csv(out / "sources" / "mri3d" / "index-000.csv")
    img = nib.load(str(out / "sources" / "mri3d" / idx.path[0]))
    t1 = nib.load(str(realdata.require("nifti_mni152")))
    # the block's affine places it where it was cut: its first voxel maps to the same world point in the template
    ijk = np.rint(np.linalg.solve(t1.affine, img.affine @ [0, 0, 0, 1])[:3]).astype(int)
    block = np.asanyarray(t1.dataobj)[ijk[0]:ijk[0] + 16, ijk[1]:ijk[1] + 16, ijk[2]:ijk[2] + 16]
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), block)
    expect, _ = to_canonical(block, img.affine)
    # the shard sample holding this block (found by content; file names are pseudonymised) and its caption
    target = expect.astype(np.float32) / 255.0
    s = next(x for x in _samples(summary["datasets"]["mri3d"])
             if x.volume.shape == target.shape and np.allclose(x.volume.astype(np.float32), target, atol=1e-3))
    assert s.text == idx.text[0] and s.meta["labels"]["tissue"] == idx.tissue[0]
    np.testing.assert_allclose(s.volume.astype(np.float32), expect / 255.0, atol=1e-3)  # fixed [0, 255] range
    assert s.meta["preprocessing"]["volume"]["normalize"]["method"] == "fixed_range"


@needs_real
def test_second_call_reuses_and_half_done_dataset_is_redone(corpus):
    from medfm.demo.corpus import DATASETS, build_demo_corpus

    out, first, _ = corpus
    again = build_demo_corpus(out, salt=SALT, workers=1, progress=False, log=lambda m: None)
    assert again["reused"] == list(DATASETS)
    assert again["counts"] == first["counts"]
    # an interrupted ehr build: its manifest never got written
    (out / "shards" / "ehr" / "manifest.json").unlink()
    sha_mri = (out / "shards" / "mri2d" / "manifest.json").read_bytes()
    third = build_demo_corpus(out, salt=SALT, workers=1, progress=False, log=lambda m: None)
    assert third["reused"] == [d for d in DATASETS if d != "ehr"]
    assert third["counts"]["ehr"] == first["counts"]["ehr"]
    assert (out / "shards" / "mri2d" / "manifest.json").read_bytes() == sha_mri
    assert verify(third["datasets"]["ehr"])[0] == []


def test_bad_arguments_are_config_errors(tmp_path):
    from medfm.demo.corpus import build_demo_corpus

    with pytest.raises(ConfigError, match="salt"):
        build_demo_corpus(tmp_path, salt="short")
    with pytest.raises(ConfigError, match="workers"):
        build_demo_corpus(tmp_path, salt=SALT, workers=0)


# --- the ingest features the corpus added to medfm.shards ------------------------------------------------------
def test_mr_range_is_a_fixed_scale_and_validated():
    vol = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out, _, applied = preprocess_volume(vol, [1, 1, 1], "MR", VolumePreprocess(mr_range=(0.0, 255.0)))
    np.testing.assert_allclose(out.astype(np.float32), [[[0, 0.2, 1.0]]], atol=1e-3)
    assert applied["normalize"] == {"method": "fixed_range", "values": [0.0, 255.0]}
    with pytest.raises(ValueError, match="mr_range"):
        VolumePreprocess(mr_range=(5.0, 5.0)).validate()


def test_index_rows_carry_labels_text_and_patient_for_nifti_and_wfdb(tmp_path):
    require_real(["nifti_anatomical", "ecg_mitbih"])
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(realdata.require("nifti_anatomical"), src / "anat.nii")
    realdata.write_mitbih_wfdb(src, record="rec")
    (src / "index.csv").write_text("path,text,patient_id,grade\nanat.nii,an MRI,p1,2\nrec.hea,an ECG,p2,0\n"
                                   "gone.nii,x,p3,1\n")
    from medfm.shards.labels import LabelSpec

    manifest = build([src], tmp_path / "out", IngestConfig(deid=DeidConfig(salt=SALT),
                                                           labels=[LabelSpec("grade", "int")]),
                     progress=False, log=lambda m: None)
    # each file once (through its row, not again on its own); the missing row is skipped with its reason
    assert manifest["totals"]["samples"] == 2 and manifest["skipped"] == {"missing_file": 1}
    got = {s.text: s for s in _samples(tmp_path / "out")}
    assert got["an MRI"].volume is not None and got["an MRI"].meta["labels"] == {"grade": 2}
    assert got["an ECG"].signal is not None and got["an ECG"].meta["labels"] == {"grade": 0}
    assert got["an MRI"].meta["patient_id"] != got["an ECG"].meta["patient_id"]


def test_real_dataset_settings_match_configs_ingest_demo_yaml():
    from pathlib import Path

    from medfm.demo.corpus import ingest_config
    from medfm.schema import load_yaml, to_dict

    yaml_cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "ingest" / "demo.yaml", IngestConfig)
    ours = ingest_config("real", SALT, 1)
    assert to_dict(ours.preprocess) == to_dict(yaml_cfg.preprocess)
    assert (ours.max_samples, to_dict(ours.ehr)) == (yaml_cfg.max_samples, to_dict(yaml_cfg.ehr))
