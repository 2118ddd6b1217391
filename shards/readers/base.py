"""What every reader returns: :class:`Record`, one study/record before pseudonymisation and preprocessing.

Readers turn one *task* (a file, or the files of one DICOM series) into records and raise :class:`ReadError`
with a short reason when the input cannot be used; ingest counts those reasons and carries on. A record still
holds the raw patient/study ids (in memory only): ingest replaces them by keyed pseudonyms before anything is
written or logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ReadError(Exception):
    """An input that cannot be used. ``reason`` is short and stable (it is a manifest counter)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


@dataclass
class Record:
    format: str                      # dicom | nifti | png | wfdb | edf | meds | ...
    file: str                        # source path relative to the build root (made non-identifying by ingest)
    patient: str                     # RAW patient id -> pseudonymised by ingest, never written
    study: str                       # RAW study id (or file stem) -> pseudonymised
    image: np.ndarray | None = None  # H x W x C, uint8/uint16 or float before preprocessing
    image_meta: dict = field(default_factory=dict)
    volume: np.ndarray | None = None  # D x H x W canonical (S, A, R) orientation, raw values (HU for CT)
    volume_meta: dict = field(default_factory=dict)  # spacing [sz, sy, sx], modality CT|MR|..., orientation
    signal: np.ndarray | None = None  # leads x samples float
    signal_meta: dict = field(default_factory=dict)  # fs, leads, units
    ehr_events: list[tuple[float, str, float | None]] | None = None  # (time in days, code, numeric value or None)
    ehr_meta: dict = field(default_factory=dict)  # static fields, index time
    text: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    phi_terms: list[str] = field(default_factory=list)  # names/ids seen in the source, scrubbed from free text
    info: dict[str, Any] = field(default_factory=dict)  # non-identifying acquisition facts (modality, sop class)
