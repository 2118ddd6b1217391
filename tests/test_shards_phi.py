"""PHI never leaves the machine: the free-text scrubber on a planted-PHI corpus, declared labels only, burned-in
annotation, and a planted export (report text, index columns, folder names, DICOM standard / nested / private
tags, a screenshot marked BurnedInAnnotation=YES) whose every planted identifier must be absent from the shards,
the manifest and the log."""

import shutil

import pydicom
import pytest
from conftest import require_real
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import SecondaryCaptureImageStorage

from medfm.shards import realdata
from medfm.shards.deid import DeidConfig
from medfm.shards.ingest import BurnedInConfig, IngestConfig, build
from medfm.shards.labels import LabelSpec
from medfm.shards.phi_corpus import evaluate, make_corpus
from medfm.shards.scrub import scrub_text
from medfm.shards.verify import iter_tar_samples

SALT = "phi-salt-0123456789"


def test_scrubber_removes_every_planted_identifier_and_keeps_clinical_phrases():
    res = evaluate(scrub_text, make_corpus(120, seed=1))
    for kind, row in res.items():
        if kind.startswith("benign:"):
            assert row["kept"] / row["total"] >= 0.95, (kind, row)
        else:
            assert row["removed"] == row["planted"], (kind, row)
    assert {"name", "given_name", "surname", "mrn", "accession", "phone", "address", "date", "age_over_89",
            "email"} <= set(res)


def test_scrub_examples_from_the_issue():
    out = scrub_text("Chloe Thornbury, 93-year-old, DOB 03/14/1951, Acc# Z99812, lives at 12 Oak Lane. "
                     "Call (415) 555-0132 or chloe.t@mail.org. A 70-year-old comparison; 5 mm nodule at C5-C6.")
    for bad in ("Chloe", "Thornbury", "93", "03/14/1951", "1951", "Z99812", "12 Oak", "555-0132", "mail.org"):
        assert bad not in out, (bad, out)
    for keep in ("70-year-old", "5 mm nodule", "C5-C6", "90+"):
        assert keep in out, (keep, out)


def _samples(out):
    return [m for p in sorted(out.glob("*.tar")) for m in iter_tar_samples(p)]


def _image_index(src, rows):
    import numpy as np
    from PIL import Image

    for name, *_ in rows:
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)).save(src / name)
    header = "path,text,patient_id,finding,patient_name,dob,note\n"
    (src / "index.csv").write_text(header + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_only_declared_label_columns_reach_the_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image_index(src, [("a.png", "ok", "p1", 1, "Chloe Thornbury", "03/14/1951", "seen by Dr. Varga"),
                       ("b.png", "ok", "p2", 7, "Omar Haddad", "1950-01-02", "fine")])
    cfg = IngestConfig(deid=DeidConfig(salt=SALT),
                       labels=[LabelSpec("finding", "int", [0, 1]), LabelSpec("note", "str")])
    manifest = build([src], tmp_path / "out", cfg, progress=False, log=lambda m: None)
    metas = [__import__("json").loads(m["meta.json"]) for m in _samples(tmp_path / "out")]
    labels = sorted((m["labels"] for m in metas), key=lambda d: d.get("finding", -1))
    assert labels == [{"note": "fine"}, {"finding": 1, "note": "seen by [NAME]"}]
    assert manifest["labels"]["dropped_columns"] == {"patient_name": 2, "dob": 2}
    assert manifest["labels"]["rejected_values"] == {"finding": 1}  # 7 is not an allowed value
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    for phi in (b"Thornbury", b"Haddad", b"1951", b"Varga"):
        assert phi not in blob


def _screenshot(path, burned_in):
    ds = pydicom.dcmread(realdata.require("dicom_mr"))
    ds.Modality = "OT"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.SOPInstanceUID + (".1" if burned_in == "YES" else ".2")
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.save_as(path)


def test_burned_in_annotation_is_skipped_unless_marked_no_or_allowed(tmp_path):
    require_real(["dicom_mr"])
    src = tmp_path / "src"
    src.mkdir()
    _screenshot(src / "shot_yes.dcm", "YES")
    _screenshot(src / "shot_no.dcm", "NO")
    cfg = IngestConfig(deid=DeidConfig(salt=SALT))
    manifest = build([src], tmp_path / "a", cfg, progress=False, log=lambda m: None)
    assert manifest["skipped"] == {"burned_in_annotation": 1} and manifest["totals"]["samples"] == 1
    cfg = IngestConfig(deid=DeidConfig(salt=SALT), burned_in=BurnedInConfig(allow=True))
    assert build([src], tmp_path / "b", cfg, progress=False, log=lambda m: None)["totals"]["samples"] == 2


PLANTED = ["Chloe", "Thornbury", "77Z3412", "Z99812", "Whitcombe", "Abernathy", "Castellano", "ST MUNGO",
           "03/14/1951", "19510314", "1951", "12 Oak Lane", "555-0132", "chloe.t@mail.org", "093Y", "93-year-old",
           "Lindqvist", "RAD2023-0045", "Fitzgerald"]


@pytest.fixture
def planted_export(tmp_path):
    require_real(["dicom_ct", "dicom_mr"])
    root = tmp_path / "export"
    folder = root / "Thornbury^Chloe_77Z3412" / "Acc Z99812 1951-03-14"
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(realdata.require("dicom_ct"))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Thornbury^Chloe", "77Z3412", "Z99812"
    ds.PatientBirthDate, ds.PatientAge = "19510314", "093Y"
    ds.InstitutionName, ds.ReferringPhysicianName = "ST MUNGO HOSPITAL", "Whitcombe^Aisha"
    ds.StudyDescription = "CT chest for Chloe Thornbury 03/14/1951"
    item = Dataset()  # nested: a referenced-patient item and a request with a physician name
    item.PatientName, item.PatientID = "Thornbury^Chloe", "77Z3412"
    ds.ReferencedPatientSequence = Sequence([item])
    req = Dataset()
    req.RequestingPhysician, req.AccessionNumber = "Abernathy^Omar", "RAD2023-0045"
    ds.RequestAttributesSequence = Sequence([req])
    ds.add_new(0x00091010, "LO", "Castellano private note")  # private tag
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "PN", "Lindqvist^Sven")
    ds.save_as(folder / "IM0001.dcm")
    _screenshot(folder / "screenshot.dcm", "YES")
    shutil.copy(realdata.require("dicom_mr"), folder / "mr.dcm")
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "Fitzgerald_scan.png")
    (folder / "reports.csv").write_text(
        "path,text,patient_id,patient_name,dob\n"
        "Fitzgerald_scan.png,\"Chloe Thornbury, 93-year-old, DOB 03/14/1951, Acc# Z99812, lives at 12 Oak Lane. "
        "Call (415) 555-0132 or chloe.t@mail.org. Discussed with Dr. Whitcombe.\",77Z3412,Chloe Thornbury,"
        "03/14/1951\n")
    return root


def test_planted_export_leaks_no_identifier(planted_export, tmp_path):
    logs = []
    out = tmp_path / "out"
    manifest = build([planted_export], out, IngestConfig(deid=DeidConfig(salt=SALT)), progress=False,
                     log=logs.append)
    assert manifest["totals"]["samples"] == 3  # CT, MR, the indexed PNG with its report
    assert manifest["skipped"].get("burned_in_annotation") == 1
    texts = [m.get("text.txt", b"").decode() for m in _samples(out)]
    assert any("[NAME]" in t for t in texts)
    blob = b"".join(p.read_bytes() for p in out.iterdir()) + "\n".join(logs).encode()
    for phi in PLANTED:
        for form in {phi, phi.replace(" ", "^"), phi.upper(), phi.lower()}:
            assert form.encode() not in blob, form
