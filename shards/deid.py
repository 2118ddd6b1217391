"""De-identification at ingest time (on by default).

- Keyed pseudonyms: patient/study ids become ``HMAC-SHA256(salt, kind + id)`` (hex, 20 chars). Without the salt
  nobody can re-compute the mapping from a guessed id; with it, re-ingesting the same source gives the same ids,
  so incremental builds and splits stay consistent. The salt comes from the ingest config or ``MEDFM_DEID_SALT``;
  without one ingest refuses to run unless the caller allows an unsalted (test-only) build.
- Dates are shifted per patient by a keyed offset (PS3.15 "Retain Longitudinal Temporal Information with Modified
  Dates"): intervals within a patient survive, calendar dates do not.
- DICOM: :func:`deidentify_dicom` applies the PS3.15 Annex E Basic Application Level Confidentiality Profile actions
  (table below) to a pydicom Dataset in place, drops private tags and replaces UIDs by keyed UIDs. Readers pull
  every meta field from the cleaned dataset, never from the original.
- Free text (reports, SR text, captions, string labels): :func:`scrub_text` (medfm.shards.scrub) removes dates,
  record/accession numbers, phones, addresses, names, ages over 89, e-mail addresses and the names/ids the source
  metadata revealed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

PROFILE = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile + Retain Longitudinal Temporal " \
          "Information with Modified Dates Option; HMAC-SHA256 pseudonyms"
SALT_ENV = "MEDFM_DEID_SALT"
MAX_DATE_SHIFT_DAYS = 365

# Annex E basic profile actions for the attributes that carry identity (keyword -> action).
# X remove, Z zero-length, D dummy value, U keyed UID, S shift date/time. Keywords absent here and not private
# are kept (pixel geometry, acquisition parameters the readers need).
ANNEX_E_ACTIONS: dict[str, str] = {
    # patient
    "PatientName": "D", "PatientID": "D", "PatientBirthDate": "Z", "PatientBirthTime": "X", "PatientSex": "K",
    "OtherPatientIDs": "X", "OtherPatientNames": "X", "OtherPatientIDsSequence": "X", "PatientBirthName": "X",
    "PatientMotherBirthName": "X", "PatientAddress": "X", "PatientTelephoneNumbers": "X", "MilitaryRank": "X",
    "BranchOfService": "X", "MedicalRecordLocator": "X", "EthnicGroup": "X", "Occupation": "X",
    "AdditionalPatientHistory": "X", "PatientComments": "X", "PatientReligiousPreference": "X",
    "PatientInsurancePlanCodeSequence": "X", "PatientState": "X", "PregnancyStatus": "X", "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X", "IssuerOfPatientID": "X", "PatientAge": "X", "PatientSize": "X",
    "PatientWeight": "X", "CountryOfResidence": "X", "RegionOfResidence": "X", "MedicalAlerts": "X",
    "Allergies": "X", "SmokingStatus": "X", "LastMenstrualDate": "X", "PatientTransportArrangements": "X",
    # study / visit
    "StudyID": "Z", "AccessionNumber": "Z", "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X", "ReferringPhysicianIdentificationSequence": "X",
    "PhysiciansOfRecord": "X", "PhysiciansOfRecordIdentificationSequence": "X", "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X", "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "OperatorsName": "X", "OperatorIdentificationSequence": "X",
    "RequestingPhysician": "X", "RequestingService": "X", "AdmissionID": "X", "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X", "IssuerOfAdmissionIDSequence": "X", "CurrentPatientLocation": "X",
    "PatientInstitutionResidence": "X", "ServiceEpisodeID": "X", "VisitComments": "X",
    "StudyDescription": "X", "SeriesDescription": "X", "ImageComments": "X", "DerivationDescription": "X",
    "RequestAttributesSequence": "X", "ReasonForStudy": "X", "RequestedProcedureDescription": "X",
    "PerformedProcedureStepDescription": "X", "PerformedProcedureStepID": "X", "ScheduledProcedureStepID": "X",
    "RequestedProcedureID": "X", "ProtocolName": "X", "ContentCreatorName": "X", "AcquisitionComments": "X",
    "TextComments": "X", "TextString": "X", "FrameComments": "X", "InterpretationText": "X",
    # institution / equipment
    "InstitutionName": "X", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X",
    "InstitutionCodeSequence": "X", "StationName": "X", "DeviceSerialNumber": "X", "DeviceUID": "U",
    "PlateID": "X", "DetectorID": "X", "GantryID": "X", "CassetteID": "X", "GeneratorID": "X",
    "SourceSerialNumber": "X", "ManufacturerModelName": "K",
    # UIDs
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U", "FrameOfReferenceUID": "U",
    "MediaStorageSOPInstanceUID": "U", "ReferencedSOPInstanceUID": "U", "IrradiationEventUID": "U",
    "SynchronizationFrameOfReferenceUID": "U", "ConcatenationUID": "U", "DimensionOrganizationUID": "U",
    "StorageMediaFileSetUID": "U", "ReferencedFrameOfReferenceUID": "U", "InstanceCreatorUID": "U",
    # dates / times (shifted per patient)
    "StudyDate": "S", "SeriesDate": "S", "AcquisitionDate": "S", "ContentDate": "S", "InstanceCreationDate": "S",
    "AcquisitionDateTime": "S", "StudyTime": "X", "SeriesTime": "X", "AcquisitionTime": "X", "ContentTime": "X",
    "InstanceCreationTime": "X", "OverlayDate": "S", "CurveDate": "S", "PerformedProcedureStepStartDate": "S",
    "PerformedProcedureStepStartTime": "X",
}
_DUMMY = {"PatientName": "ANONYMIZED", "PatientID": "ANONYMIZED"}

# The de-identification claim, precisely: shards and manifests carry no DICOM header value except these fields
# (the readers' meta and skip messages), plus keyed pseudonyms of PatientID and StudyInstanceUID. Every other
# attribute (standard, nested, private) is read in memory only. tests/test_shards_export.py scans every header of
# the packages' test files against the build's shards, manifest and log and fails on anything outside this list.
HEADER_FIELDS_IN_SHARDS = {
    "Modality": "meta.source.modality, meta.volume.modality",
    "SOPClassUID": "its name only (meta.source.sop_class)",
    "TransferSyntaxUID": "its name only (meta.source.transfer_syntax)",
    "PhotometricInterpretation": "meta.image.photometric_source",
    "BitsStored": "meta.image source bits",
    "Rows": "array shape", "Columns": "array shape", "NumberOfFrames": "array shape",
    "PixelSpacing": "meta.image.source_pixel_spacing, meta.volume.spacing",
    "ImagerPixelSpacing": "meta.image.source_pixel_spacing",
    "SliceThickness": "meta.volume.spacing (single slice)", "SpacingBetweenSlices": "meta.volume.spacing",
    "WindowCenter": "meta.preprocessing.image window", "WindowWidth": "meta.preprocessing.image window",
    "SamplingFrequency": "meta.signal.fs",
    "CodeMeaning": "waveform lead names (ChannelSourceSequence), meta.signal.leads; SR coded findings (text.txt)",
    "TextValue": "DICOM SR report text, scrubbed (text.txt of its study's images, or a text-only sample)",
    "NumericValue": "DICOM SR measurements (text.txt)",
    "CodeValue": "waveform channel units (ChannelSensitivityUnitsSequence), meta.signal.units",
    "DirectoryRecordType": "a broken DICOMDIR's record type quoted in its bad_dicomdir skip message",
}



class DeidError(ValueError):
    """De-identification cannot be done safely (no salt, ...)."""


@dataclass
class DeidConfig:
    enabled: bool = True
    salt: str | None = None          # prefer MEDFM_DEID_SALT over writing the salt into a YAML
    allow_unsalted: bool = False     # tests only: a fixed public salt, pseudonyms are NOT protected
    shift_dates: bool = True
    scrub_text: bool = True
    keep_sex: bool = True

    def validate(self):
        if self.salt is not None and len(self.salt) < 8:
            raise ValueError("deid.salt: use at least 8 characters")


def resolve_salt(cfg: DeidConfig) -> tuple[bytes, str]:
    """(salt bytes, description of where it came from); raises DeidError when de-identification has no salt."""
    if cfg.salt:
        return cfg.salt.encode(), "config"
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode(), "env"
    if cfg.allow_unsalted:
        return b"medfm-unsalted-test-only", "unsalted"
    raise DeidError(f"de-identification needs a secret salt: set {SALT_ENV} or deid.salt in the ingest config "
                    "(--allow-unsalted only for tests)")


class Pseudonymizer:
    """Keyed pseudonyms, UIDs and per-patient date shifts (same salt + same id -> same output, everywhere)."""

    def __init__(self, salt: bytes):
        self._salt = bytes(salt)

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._salt, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, kind: str, value: str) -> str:
        return self._mac(kind, str(value)).hex()[:20]

    def patient(self, raw_id: str) -> str:
        return "p" + self.pseudonym("patient", raw_id)

    def study(self, raw_patient: str, raw_study: str) -> str:
        return "s" + self.pseudonym("study", f"{raw_patient}\x00{raw_study}")

    def uid(self, raw_uid: str) -> str:
        # 2.25.<decimal of 128-bit int> is the UUID-derived UID root of PS3.5 B.2: a valid UID, no registry needed.
        return "2.25." + str(int.from_bytes(self._mac("uid", raw_uid)[:16], "big"))

    def path(self, rel: str) -> str:
        """A source path made safe to show: every component replaced by a keyed pseudonym (folder and file names
        of exports are often patient names, MRNs or accession numbers), the file extension and an index table's
        ``#row`` suffix kept. The same folder gets the same pseudonym everywhere, so log lines still group."""
        rel = str(rel).replace("\\", "/")
        rel, hash_, row = rel.partition("#")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        out = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            ext = _extension(part) if last else ""
            out.append(("f" if last else "d") + self.pseudonym("path", part)[:10] + ext)
        return "/".join(out) + (hash_ + row if row.isdigit() else "")

    def date_shift_days(self, raw_patient: str) -> int:
        """Whole days in [-MAX_DATE_SHIFT_DAYS, -1]: always backwards so a shifted date never lands in the future."""
        return -1 - int.from_bytes(self._mac("dateshift", raw_patient)[:4], "big") % MAX_DATE_SHIFT_DAYS


# Extensions a displayed path keeps (anything else could be part of a name: ``Doe.John``).
SHOWN_EXTENSIONS = (".nii.gz", ".tar.gz", ".dcm", ".dicom", ".ima", ".nii", ".hea", ".dat", ".edf", ".bdf", ".csv",
                    ".tsv", ".jsonl", ".ndjson", ".parquet", ".json", ".png", ".jpg", ".jpeg", ".bmp", ".tif",
                    ".tiff", ".txt", ".xml", ".par", ".rec", ".mnc", ".mgz", ".hdr", ".img", ".gz", ".zip")


def _extension(name: str) -> str:
    low = name.lower()
    return next((e for e in SHOWN_EXTENSIONS if low.endswith(e) and len(low) > len(e)), "")


def shift_dicom_date(value: str, days: int) -> str:
    """Shift a DICOM DA (YYYYMMDD) or the date part of a DT; returns '' when unparseable (then it is dropped)."""
    text = str(value).strip()
    if len(text) < 8 or not text[:8].isdigit():
        return ""
    try:
        d = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8])) + _dt.timedelta(days=days)
    except ValueError:
        return ""
    return d.strftime("%Y%m%d")


def deidentify_dicom(ds, pseudo: Pseudonymizer, raw_patient: str, cfg: DeidConfig) -> dict:
    """Apply the basic profile to ``ds`` (in place, recursing into sequences). Returns a stamp of what was done."""
    from pydicom.dataelem import DataElement

    days = pseudo.date_shift_days(raw_patient) if cfg.shift_dates else None
    counts = {"removed": 0, "replaced": 0, "private": 0}
    ds.remove_private_tags()

    def clean(dataset):
        for elem in list(dataset):
            kw = elem.keyword
            action = ANNEX_E_ACTIONS.get(kw)
            if elem.VR == "SQ" and action is None:
                for item in elem.value or []:
                    clean(item)
                continue
            if action is None or (action == "K" and (kw != "PatientSex" or cfg.keep_sex)):
                continue
            if action == "K" or action == "X" or (action == "S" and days is None):
                del dataset[elem.tag]
                counts["removed"] += 1
            elif action == "Z":
                dataset[elem.tag] = DataElement(elem.tag, elem.VR, "")
                counts["replaced"] += 1
            elif action == "D":
                dataset[elem.tag] = DataElement(elem.tag, elem.VR, _DUMMY.get(kw, "ANONYMIZED"))
                counts["replaced"] += 1
            elif action == "U":
                if elem.VM > 1:
                    dataset[elem.tag].value = [pseudo.uid(str(v)) for v in elem.value]
                elif elem.value:
                    dataset[elem.tag].value = pseudo.uid(str(elem.value))
                counts["replaced"] += 1
            elif action == "S":
                shifted = shift_dicom_date(elem.value, days) if elem.value else ""
                if shifted:
                    dataset[elem.tag].value = shifted if elem.VR == "DA" else shifted + str(elem.value)[8:]
                    counts["replaced"] += 1
                else:
                    del dataset[elem.tag]
                    counts["removed"] += 1

    clean(ds)
    if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = pseudo.uid(str(ds.file_meta.MediaStorageSOPInstanceUID))
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medfm basic profile"
    return counts


# --- free text: one owner, medfm.shards.scrub -------------------------------------------------------------------
def name_terms(*values) -> list[str]:
    """Searchable pieces of names/ids (``Doe^John`` -> ``Doe^John``, ``Doe``, ``John``), shortest ignored."""
    out = set()
    for v in values:
        if v is None:
            continue
        text = str(v).strip()
        if not text or text.upper() in ("ANONYMIZED", "ANONYMOUS"):
            continue
        out.add(text)
        for part in re.split(r"[\^,\s]+", text):
            if len(part) >= 3:
                out.add(part)
    return sorted(out, key=len, reverse=True)


def scrub_text(text: str, terms=()) -> str:
    """Free text without identifiers (dates, ids, phones, addresses, names, ages over 89, e-mails): see
    :mod:`medfm.shards.scrub`; ``terms`` are the names/ids the source's metadata revealed."""
    from medfm.shards.scrub import scrub_text as _scrub

    return _scrub(text, terms)


def stamp(cfg: DeidConfig, salt_source: str) -> dict:
    """The manifest's de-identification record."""
    if not cfg.enabled:
        return {"applied": False, "identifiable": True, "profile": None,
                "warning": "built with de-identification disabled: shards may contain PHI"}
    return {"applied": True, "identifiable": False, "profile": PROFILE, "salt_source": salt_source,
            "pseudonym": "HMAC-SHA256", "date_shift": "per patient, -1..-365 days" if cfg.shift_dates else "none",
            "text_scrubbing": cfg.scrub_text, "private_tags": "removed"}
