"""Physiological signals: WFDB records (.hea + .dat via wfdb) and EDF/EDF+/BDF (pyedflib) -> leads x samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfm.shards.deid import name_terms
from medfm.shards.readers.base import ReadError, Record


def read_wfdb(header: Path, rel: str) -> list[Record]:
    import wfdb

    record_path = str(header)[: -len(".hea")]
    try:
        rec = wfdb.rdrecord(record_path, physical=True)
    except Exception as exc:
        raise ReadError("bad_wfdb", f"{rel}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    sig = rec.p_signal
    if sig is None or sig.ndim != 2 or sig.shape[0] == 0:
        raise ReadError("no_samples", f"{rel}: record has no samples")
    if not np.isfinite(sig).all():  # WFDB marks gaps as NaN: zero them, the loader masks nothing finer than leads
        sig = np.nan_to_num(sig, nan=0.0, posinf=0.0, neginf=0.0)
    name = Path(rel).name[: -len(".hea")]
    terms = name_terms(*(c for c in (rec.comments or []) if c))  # comments may name the patient
    return [Record(format="wfdb", file=rel, patient=name, study=name, signal=sig.T.astype(np.float64),
                   signal_meta={"fs": float(rec.fs), "leads": list(rec.sig_name), "units": list(rec.units)},
                   phi_terms=terms, info={"modality": "signal"})]


def read_edf(path: Path, rel: str) -> list[Record]:
    """All channels that share the most common sampling rate (EDF allows per-channel rates)."""
    import pyedflib

    try:
        f = pyedflib.EdfReader(str(path))
    except Exception as exc:
        raise ReadError("bad_edf", f"{rel}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    try:
        n = f.signals_in_file
        if n == 0:
            raise ReadError("no_samples", f"{rel}: no signals")
        freqs = np.asarray(f.getSampleFrequencies(), dtype=np.float64)
        labels = f.getSignalLabels()
        rates, counts = np.unique(freqs, return_counts=True)
        fs = float(rates[np.argmax(counts)])
        chans = [i for i in range(n) if freqs[i] == fs and not labels[i].startswith("EDF Annotations")]
        length = min(int(f.getNSamples()[i]) for i in chans)
        if length == 0:
            raise ReadError("no_samples", f"{rel}: zero-length signals")
        sig = np.stack([f.readSignal(i)[:length] for i in chans]).astype(np.float64)
        units = [f.getPhysicalDimension(i) for i in chans]
        patient_code = f.getPatientCode() or Path(rel).stem
        terms = name_terms(f.getPatientName(), f.getPatientCode(), f.getTechnician(), f.getAdmincode())
    finally:
        f.close()
    return [Record(format="edf", file=rel, patient=patient_code, study=Path(rel).stem, signal=sig,
                   signal_meta={"fs": fs, "leads": [labels[i] for i in chans], "units": units},
                   phi_terms=terms, info={"modality": "signal", "dropped_channels": n - len(chans)})]
