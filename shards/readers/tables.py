"""Row-based sources: an image index (PNG/JPEG + report text) and EHR event tables in MEDS columns.

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


def read_image_index(path: Path, rel: str) -> list:
    """Rows: ``path`` (relative to the index file), optional ``text``, ``patient_id``, ``study_id``; other columns
    become labels."""
    df = read_table(path)
    out: list = []
    extra = [c for c in df.columns if c not in ("path", "text", "patient_id", "study_id")]
    for i, row in enumerate(df.to_dict("records")):
        where = f"{rel}:row {i + 1}"
        img_path = row.get("path")
        if not isinstance(img_path, str) or not img_path:
            out.append(ReadError("missing_path", f"{where}: empty path"))
            continue
        try:
            arr = load_image((path.parent / img_path).resolve())
        except FileNotFoundError:
            out.append(ReadError("missing_file", f"{where}: {img_path} not found"))
            continue
        except ReadError as exc:
            out.append(ReadError(exc.reason, f"{where}: {img_path}: {exc.message}"))
            continue
        text = row.get("text")
        text = text if isinstance(text, str) and text.strip() else None
        patient = str(row.get("patient_id") or Path(img_path).stem)
        study = str(row.get("study_id") or img_path)
        labels = {c: _label_value(row[c]) for c in extra if _label_value(row[c]) is not None}
        out.append(_image_record(arr, Path(img_path).suffix.lstrip(".").lower() or "image", f"{rel}#{i + 1}",
                                 patient, study, text, labels))
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
    null_time = raw_time.isna() | (raw_time.astype(str).str.strip() == "")
    times = pd.to_datetime(raw_time.where(~null_time), errors="coerce", utc=True, format="mixed")
    bad = (~null_time) & times.isna()
    for i in np.flatnonzero(bad.to_numpy())[:50]:
        out.append(ReadError("bad_time", f"{rel}:row {i + 2}: unparseable time {str(raw_time.iloc[i])[:40]!r}"))
    if bad.sum() > 50:
        out.append(ReadError("bad_time", f"{rel}: {int(bad.sum()) - 50} more rows with unparseable time"))
    values = pd.to_numeric(df["numeric_value"], errors="coerce") if "numeric_value" in df.columns else None
    df = df.assign(ev_time=times, ev_value=values if values is not None else np.nan, ev_static=null_time)
    df = df[~bad]
    for subject, g in df.groupby(df["subject_id"].astype(str), sort=True):
        static = {str(r.code): _label_value(r.ev_value) if not pd.isna(r.ev_value) else True
                  for r in g[g["ev_static"]].itertuples()}
        ev = g[~g["ev_static"]].sort_values(["ev_time", "code"], kind="stable")
        if ev.empty:
            out.append(ReadError("no_events", f"{rel}: a subject has only static rows"))
            continue
        labels = {}
        if label_codes:
            is_label = ev["code"].astype(str).isin(label_codes)
            for r in ev[is_label].itertuples():
                labels[str(r.code)] = _label_value(r.ev_value) if not pd.isna(r.ev_value) else 1
            ev = ev[~is_label]
            if ev.empty:
                out.append(ReadError("no_events", f"{rel}: a subject has only label events"))
                continue
        idx_rows = ev[ev["code"].astype(str) == index_code] if index_code else ev.iloc[0:0]
        index_time = idx_rows["ev_time"].iloc[0] if len(idx_rows) else ev["ev_time"].iloc[-1]
        rel_days = (ev["ev_time"] - index_time).dt.total_seconds().to_numpy() / 86400.0
        keep = rel_days <= 1e-9
        if window_days is not None:
            keep &= rel_days >= -float(window_days)
        ev, rel_days = ev[keep], rel_days[keep]
        if ev.empty:
            out.append(ReadError("no_events", f"{rel}: no events in the window before the index time"))
            continue
        if len(ev) > max_events:  # keep the most recent events: closest to the index time
            ev, rel_days = ev.iloc[-max_events:], rel_days[-max_events:]
        events = [(float(t), str(c), None if pd.isna(v) else float(v))
                  for t, c, v in zip(rel_days, ev["code"].astype(str), ev["ev_value"])]
        out.append(Record(format="meds", file=rel, patient=str(subject), study=f"{subject}-ehr", ehr_events=events,
                          ehr_meta={"static": static, "index": "index_code" if len(idx_rows) else "last_event"},
                          labels=labels, info={"modality": "ehr", "n_events": len(events)}))
    return out


