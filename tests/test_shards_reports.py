"""Radiology reports stored as DICOM SR: the report text goes to the images of the same study (matched by the
study pseudonym), scrubbed like any report; an SR without images of its study is a text-only sample; ``--part``
keeps a study's report and images on one node."""

import json
import shutil

import pydicom
import pytest
from conftest import require_real
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medfm.shards import realdata
from medfm.shards.deid import DeidConfig
from medfm.shards.ingest import IngestConfig, build
from medfm.shards.readers.dicom import sr_text
from medfm.shards.verify import iter_tar_samples

SALT = "report-salt-0123456789"
STUDY = "1.2.826.0.1.3680043.8.498.14141414"


def _code(meaning, value="X1", scheme="99MEDFM"):
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(value_type, concept, **values):
    it = Dataset()
    it.RelationshipType, it.ValueType = "CONTAINS", value_type
    it.ConceptNameCodeSequence = Sequence([_code(concept)])
    for k, v in values.items():
        setattr(it, k, v)
    return it


def _write_sr(path, study_uid):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SR", study_uid, generate_uid()
    ds.PatientName, ds.PatientID = "Varga^Ingrid", "MRN5512Z"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("Radiology Report")])
    num = Dataset()
    num.NumericValue = "4"
    num.MeasurementUnitsCodeSequence = Sequence([_code("millimeter", "mm", "UCUM")])
    ds.ContentSequence = Sequence([
        _item("PNAME", "Recording Observer's Name", PersonName="Abernathy^Omar"),
        _item("TEXT", "Findings", TextValue="Small nodule in the right upper lobe. Ingrid Varga informed; "
                                            "Dr. Abernathy notified on 03/14/2021."),
        _item("CODE", "Finding", ConceptCodeSequence=Sequence([_code("Pulmonary nodule")])),
        _item("NUM", "Diameter", MeasuredValueSequence=Sequence([num])),
    ])
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def study_with_report(tmp_path):
    require_real(["dicom_ct"])
    src = tmp_path / "src"
    src.mkdir()
    ct = pydicom.dcmread(realdata.require("dicom_ct"))
    ct.StudyInstanceUID, ct.PatientName, ct.PatientID = STUDY, "Varga^Ingrid", "MRN5512Z"
    ct.save_as(src / "ct.dcm")
    _write_sr(src / "report.dcm", STUDY)
    trees = dict(realdata.export_trees())
    for name in ("test-SR.dcm", "reportsi.dcm"):  # pydicom's Comprehensive and Basic Text SR: no images of theirs
        shutil.copy(trees["pydicom"] / name, src / name)
    return src


def _metas_and_texts(out):
    rows = []
    for shard in sorted(out.glob("*.tar")):
        for m in iter_tar_samples(shard):
            rows.append((json.loads(m["meta.json"]), m.get("text.txt", b"").decode()))
    return rows


def test_sr_text_extraction_skips_observer_context():
    trees = dict(realdata.export_trees())
    text = sr_text(pydicom.dcmread(trees["pydicom"] / "test-SR.dcm"))
    assert "A mass of" in text and "Diameter: 3" in text and "was detected." in text


def test_report_becomes_text_of_its_study_images_and_unmatched_sr_text_only(study_with_report, tmp_path):
    manifest = build([study_with_report], tmp_path / "out", IngestConfig(deid=DeidConfig(salt=SALT)),
                     progress=False, log=lambda m: None)
    rows = _metas_and_texts(tmp_path / "out")
    ct = [(m, t) for m, t in rows if "volume" in m["modalities"]]
    assert len(ct) == 1
    meta, text = ct[0]
    assert "Small nodule in the right upper lobe" in text and "Pulmonary nodule" in text and "4 mm" in text
    for phi in ("Varga", "Ingrid", "Abernathy", "03/14/2021", "MRN5512Z"):
        assert phi not in text, phi
    assert "[NAME]" in text and "[DATE]" in text
    text_only = [(m, t) for m, t in rows if m["modalities"] == ["text"]]
    assert len(text_only) == 2 and any("A mass of" in t for _, t in text_only)  # test-SR, reportsi
    assert all(m["source"]["modality"] == "SR" for m, _ in text_only)
    assert manifest["sources"]["reports"] == {"sr_documents": 3, "studies_with_images": 1, "text_only": 2}
    assert "unsupported_modality" not in manifest["skipped"]


def test_part_builds_keep_a_report_with_its_images(study_with_report, tmp_path):
    found = 0
    for i in (1, 2, 3):
        cfg = IngestConfig(deid=DeidConfig(salt=SALT), part=f"{i}/3")
        build([study_with_report], tmp_path / f"p{i}", cfg, progress=False, log=lambda m: None)
        for m, t in _metas_and_texts(tmp_path / f"p{i}"):
            if "volume" in m["modalities"]:
                found += 1
                assert "Small nodule" in t
    assert found == 1
