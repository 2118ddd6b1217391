"""Row-based sources: an index table (images, NIfTI volumes or signal records + text, patient, labels) and EHR
event tables in MEDS columns.

Both return a list mixing :class:`Record` and :class:`ReadError` (one per unusable row), so one bad row is skipped
and counted without losing the rest of the table.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medfm.shards.readers.base import ReadError, Record

MEDS_COLUMNS = ("subject_id", "time", "code", "numeric_value")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_table(path: Path):
    """A CSV / TSV / JSONL / Parquet file as a pandas DataFrame (strings kept as strings)."""
    import pandas as pd

    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".jsonl", ".ndjson")):
            return pd.read_json(path, lines=True, dtype=False)
        sep = "\t" if name.endswith(".tsv") else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    except Exception as exc:
        raise ReadError("bad_table", f"{path.name}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None


def table_kind(columns) -> str | None:
    cols = {str(c) for c in columns}
    if {"subject_id", "time", "code"} <= cols:
        return "meds"
    if "path" in cols:
        return "image_index"
    return None


def _label_value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        try:
            f = float(v)
            return int(f) if f.is_integer() else f
        except ValueError:
            return v
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def load_image(path: Path) -> np.ndarray:
    """PNG/JPEG/... -> H x W x C (uint16 for 16-bit greyscale, else uint8 with C = 1 or 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(im, dtype=np.uint16)[..., None]
            if im.mode in ("L", "1", "P", "LA"):
                return np.asarray(im.convert("L"))[..., None]
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ReadError("bad_image", f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _image_record(arr, fmt, file, patient, study, text=None, labels=None) -> Record:
    return Record(format=fmt, file=file, patient=patient, study=study, image=arr,
                  image_meta={"channels": arr.shape[2], "window": None,
                              "photometric_source": "RGB" if arr.shape[2] == 3 else "MONOCHROME2"},
                  text=text, labels=labels or {}, info={"modality": "image"})


def read_image_file(path: Path, rel: str) -> list[Record]:
    """A bare image without an index row: image-only sample, patient = file stem."""
    arr = load_image(path)
    return [_image_record(arr, path.suffix.lstrip(".").lower(), rel, path.stem, rel)]


INDEXED_VOLUME_EXT = (".nii", ".nii.gz")
INDEXED_SIGNAL_EXT = (".hea", ".edf", ".bdf")


def _read_indexed_file(file: Path, name: str, rel: str, nifti_modality: str) -> Record:
    """The record of one index row's file: an image (PIL), a NIfTI volume, or a WFDB / EDF signal."""
    from medfm.shards.readers.nifti import read_nifti
    from medfm.shards.readers.signals import read_edf, read_wfdb

    low = name.lower()
    if low.endswith(INDEXED_VOLUME_EXT):
        if not file.exists():
            raise FileNotFoundError(file)
        return read_nifti(file, rel, nifti_modality)[0]
    if low.endswith(INDEXED_SIGNAL_EXT):
        if not file.exists():
            raise FileNotFoundError(file)
        return (read_wfdb if low.endswith(".hea") else read_edf)(file, rel)[0]
    arr = load_image(file)
    return _image_record(arr, Path(name).suffix.lstrip(".").lower() or "image", rel, "", "")


def read_image_index(path: Path, rel: str, nifti_modality: str = "MR") -> list:
    """An index table: one sample per row. Columns: ``path`` (relative to the index file) to an image
    (PNG/JPEG/...), a NIfTI volume (``.nii``/``.nii.gz``) or a signal record (WFDB ``.hea``, ``.edf``/``.bdf``);
    optional ``text`` (report / caption), ``patient_id``, ``study_id``; every other column becomes a label.

    This is how labels, captions and patient grouping reach formats whose files carry none (PNG, NIfTI, WFDB
    windows). Files named by an index are not ingested a second time on their own (see ingest.discover).
    """
    df = read_table(path)
    out: list = []
    extra = [c for c in df.columns if c not in ("path", "text", "patient_id", "study_id")]
    for i, row in enumerate(df.to_dict("records")):
        where = f"{rel}:row {i + 1}"
        item_path = row.get("path")
        if not isinstance(item_path, str) or not item_path:
            out.append(ReadError("missing_path", f"{where}: empty path"))
            continue
        try:
            rec = _read_indexed_file((path.parent / item_path).resolve(), item_path, f"{rel}#{i + 1}",
                                     nifti_modality)
        except FileNotFoundError:
            out.append(ReadError("missing_file", f"{where}: {item_path} not found"))
            continue
        except ReadError as exc:
            out.append(ReadError(exc.reason, f"{where}: {item_path}: {exc.message}"))
            continue
        text = row.get("text")
        rec.text = text if isinstance(text, str) and text.strip() else None
        rec.patient = str(row.get("patient_id") or Path(item_path).name.split(".")[0])
        rec.study = str(row.get("study_id") or item_path)
        rec.file = f"{rel}#{i + 1}"
        rec.labels = {c: _label_value(row[c]) for c in extra if _label_value(row[c]) is not None}
        out.append(rec)
    return out


def read_meds(path: Path, rel: str, index_code: str | None = None, window_days: float | None = None,
              max_events: int = 4096, label_codes: tuple[str, ...] = ()) -> list:
    """MEDS events -> one record per subject. Rows with a null time are static (sex, birth year, ...).

    Time is stored in days relative to the index time (the subject's first ``index_code`` event, else its last
    event), so absolute dates never reach the shards. ``window_days`` keeps only events in [index - window, index];
    ``label_codes`` turn those codes' numeric values into labels (and are removed from the sequence so a label
    cannot leak into the input).
    """
    import pandas as pd

    df = read_table(path)
    missing = [c for c in ("subject_id", "time", "code") if c not in df.columns]
    if missing:
        raise ReadError("bad_table", f"{rel}: MEDS table lacks column(s) {missing}")
    out: list = []
    raw_time = df["time"]
    null_time = (raw_time.isna() | (raw_time.astype(str).str.strip() == "")).to_numpy()
    times = pd.to_datetime(raw_time.where(~null_time), errors="coerce", utc=True, format="mixed")
    bad = (~null_time) & times.isna().to_numpy()
    for i in np.flatnonzero(bad)[:50]:
        out.append(ReadError("bad_time", f"{rel}:row {i + 2}: unparseable time {str(raw_time.iloc[i])[:40]!r}"))
    if bad.sum() > 50:
        out.append(ReadError("bad_time", f"{rel}: {int(bad.sum()) - 50} more rows with unparseable time"))
    values = (pd.to_numeric(df["numeric_value"], errors="coerce").to_numpy(dtype=np.float64)
              if "numeric_value" in df.columns else np.full(len(df), np.nan))
    subjects = df["subject_id"].astype(str).to_numpy(dtype=str)
    codes = df["code"].astype(str).to_numpy(dtype=str)
    # Plain arrays and one global sort instead of per-subject pandas operations (those cost ~30 ms per subject).
    static_of: dict[str, dict] = {}
    for i in np.flatnonzero(null_time):  # file order, so a repeated static code keeps its last value
        static_of.setdefault(subjects[i], {})[codes[i]] = _label_value(values[i]) if not np.isnan(values[i]) else True
    ev_rows = np.flatnonzero(~null_time & ~bad)
    ns = times.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    # within a subject: by time, then code, stable (file order breaks ties)
    order = ev_rows[np.lexsort((ev_rows, codes[ev_rows], ns[ev_rows], subjects[ev_rows]))]
    ev_subj = subjects[order]
    starts = np.flatnonzero(np.r_[True, ev_subj[1:] != ev_subj[:-1]]) if len(order) else np.zeros(0, np.int64)
    bounds = dict(zip(ev_subj[starts], zip(starts, np.r_[starts[1:], len(order)])))
    label_set = set(label_codes)
    for subject in sorted(set(bounds) | set(static_of)):
        static = static_of.get(subject, {})
        if subject not in bounds:
            out.append(ReadError("no_events", f"{rel}: a subject has only static rows"))
            continue
        a, b = bounds[subject]
        rows = order[a:b]
        labels = {}
        if label_set:
            is_label = np.array([codes[r] in label_set for r in rows], dtype=bool)
            for r in rows[is_label]:
                labels[codes[r]] = _label_value(values[r]) if not np.isnan(values[r]) else 1
            rows = rows[~is_label]
            if len(rows) == 0:
                out.append(ReadError("no_events", f"{rel}: a subject has only label events"))
                continue
        idx = np.flatnonzero(codes[rows] == index_code) if index_code else np.zeros(0, np.int64)
        index_ns = ns[rows[idx[0]]] if len(idx) else ns[rows[-1]]
        rel_days = (ns[rows] - index_ns) / 1e9 / 86400.0
        keep = rel_days <= 1e-9
        if window_days is not None:
            keep &= rel_days >= -float(window_days)
        rows, rel_days = rows[keep], rel_days[keep]
        if len(rows) == 0:
            out.append(ReadError("no_events", f"{rel}: no events in the window before the index time"))
            continue
        if len(rows) > max_events:  # keep the most recent events: closest to the index time
            rows, rel_days = rows[-max_events:], rel_days[-max_events:]
        events = [(float(t), str(codes[r]), None if np.isnan(values[r]) else float(values[r]))
                  for t, r in zip(rel_days, rows)]
        out.append(Record(format="meds", file=rel, patient=subject, study=f"{subject}-ehr", ehr_events=events,
                          ehr_meta={"static": static, "index": "index_code" if len(idx) else "last_event"},
                          labels=labels, info={"modality": "ehr", "n_events": len(events)}))
    return out
