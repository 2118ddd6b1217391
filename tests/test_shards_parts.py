"""Many nodes: ``shards build --part I/N`` on three "nodes" + ``shards merge`` give the same samples, splits and
arrays as one build (EHR code ids are per part and re-mapped by the merge, so EHR events compare as codes)."""

import hashlib
import json
import shutil

import numpy as np
import pydicom
import pytest
from conftest import require_real

from medfm.launch.cli import main as medfm_main
from medfm.shards import realdata
from medfm.shards.manifest import load_manifest
from medfm.shards.sample import decode_sample
from medfm.shards.verify import iter_tar_samples, verify

SALT = "parts-salt-0123456789"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    require_real(["dicom_ct", "dicom_mr", "dicom_mr_series_dir", "nifti_anatomical", "table_stanford_heart",
                  "dicom_radiograph"])
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(realdata.require("dicom_mr_series_dir"), src / "series")  # multi-file MR series
    for name in ("dicom_ct", "dicom_mr", "nifti_anatomical", "dicom_radiograph"):
        shutil.copy(realdata.require(name), src / realdata.require(name).name)
    base = pydicom.dcmread(realdata.require("dicom_ct"))
    for k in range(4):  # a 4-slice CT series: must land whole in one part
        d = pydicom.dcmread(realdata.require("dicom_ct"))
        d.ImagePositionPatient = [base.ImagePositionPatient[0], base.ImagePositionPatient[1],
                                  float(base.ImagePositionPatient[2]) + 2.5 * k]
        d.SOPInstanceUID = f"{base.SOPInstanceUID}.7{k}"
        d.SeriesInstanceUID = f"{base.SeriesInstanceUID}.7"
        d.save_as(src / f"ctseries_{k}.dcm")
    realdata.stanford_heart_meds(src / "ehr" / "heart.csv", n_subjects=15)
    (src / "junk.bin").write_bytes(b"x" * 100)
    return src


def _build(src, out, monkeypatch, *extra):
    monkeypatch.setenv("MEDFM_DEID_SALT", SALT)
    assert medfm_main(["shards", "build", str(src), "--out", str(out), "--quiet", *extra]) == 0


def _contents(d):
    manifest = load_manifest(d)
    vocab = manifest.get("vocabularies", {}).get("ehr", [])
    out = {}
    for shard in sorted(d.glob("*.tar")):
        for m in iter_tar_samples(shard):
            s = decode_sample(m)
            row = {"meta": s.meta}
            for name in ("image", "volume", "signal"):
                arr = getattr(s, name)
                if arr is not None:
                    row[name] = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
            if s.text is not None:
                row["text"] = s.text
            if s.ehr is not None:
                row["ehr"] = [(float(t), vocab[int(c)], float(v), float(h)) for t, c, v, h in s.ehr]
            out[s.key] = row
    return manifest, out


def test_three_parts_merged_equal_one_build(source, tmp_path, monkeypatch):
    _build(source, tmp_path / "whole", monkeypatch)
    for i in (1, 2, 3):
        _build(source, tmp_path / f"part{i}", monkeypatch, "--part", f"{i}/3")
    parts = [load_manifest(tmp_path / f"part{i}") for i in (1, 2, 3)]
    assert all(p["totals"]["samples"] > 0 for p in parts)  # the inputs really were split
    assert medfm_main(["shards", "merge", *(str(tmp_path / f"part{i}") for i in (1, 2, 3)),
                       "--out", str(tmp_path / "merged")]) == 0
    whole, a = _contents(tmp_path / "whole")
    merged, b = _contents(tmp_path / "merged")
    assert sorted(a) == sorted(b) and len(a) > 20
    for key in a:
        assert a[key] == b[key], key  # meta (split, ids, provenance), array checksums, text, EHR codes
    assert merged["totals"] == whole["totals"]
    assert merged["skipped"] == whole["skipped"] and merged["skipped"]
    assert merged["sources"]["inputs"] == whole["sources"]["inputs"]
    assert set(merged["vocabularies"]["ehr"]) == set(whole["vocabularies"]["ehr"])
    assert verify(tmp_path / "merged")[0] == []
    # the 4-slice series is one volume in exactly one part
    vols = [json.loads(m["meta.json"]) for i in (1, 2, 3) for sh in sorted((tmp_path / f"part{i}").glob("*.tar"))
            for m in iter_tar_samples(sh)]
    assert sum(1 for v in vols if v.get("volume", {}).get("shape", [0])[0] == 4) == 1


def test_bad_part_and_mismatched_merge_are_usage_errors(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDFM_DEID_SALT", SALT)
    assert medfm_main(["shards", "build", str(source), "--out", str(tmp_path / "x"), "--part", "4/3"]) == 2
    _build(source, tmp_path / "a", monkeypatch, "--part", "1/3")
    _build(source, tmp_path / "b", monkeypatch, "--part", "2/3", "--set", "seed=5")
    capsys.readouterr()
    assert medfm_main(["shards", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                       str(tmp_path / "m")]) == 2
    assert "differs" in capsys.readouterr().err  # the split seed differs: splits would disagree
    assert medfm_main(["shards", "merge", str(tmp_path / "a"), str(tmp_path / "a"), "--out",
                       str(tmp_path / "m2")]) == 2
