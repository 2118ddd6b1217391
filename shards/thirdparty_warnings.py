"""Third-party warnings during ingest (pydicom VR warnings, nibabel header notes, ...) counted per kind.

A real export triggers the same warning on thousands of files; printed per file it buries the lines that matter.
Ingest runs every stage of one input inside :func:`counted_warnings`, which records warnings instead of printing
them, and the build summary and manifest carry the counts (``manifest["warnings"]``).

A kind is ``<top-level module>:<category>: <message shape>``: quoted values, numbers and UIDs are cut out of the
message, because a header value quoted in a warning may be identifying (a name in a PN value, an MRN).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from contextlib import contextmanager

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|<[^>]*>|\([^)]*\)|\[[^\]]*\]")
_TOKEN = re.compile(r"[A-Za-z][A-Za-z_-]*")
# loggers whose WARNING records would otherwise reach stderr (pydicom's duplicate its warnings.warn calls)
QUIET_LOGGERS = ("pydicom", "nibabel")
MAX_KIND_WORDS = 10


def warning_kind(category: type, message: str, module: str = "") -> str:
    """Stable, value-free key for one warning (see the module docstring)."""
    words = _TOKEN.findall(_QUOTED.sub(" ", str(message)))
    shape = " ".join(w for w in words if len(w) < 25)[:100]
    words = shape.split()[:MAX_KIND_WORDS]
    top = (module or "").split(".")[0] or "python"
    return f"{top}:{category.__name__}: {' '.join(words)}"


def _module_of(w: warnings.WarningMessage) -> str:
    path = str(w.filename).replace("\\", "/")
    m = re.search(r"site-packages/([A-Za-z0-9_]+)", path) or re.search(r"/([A-Za-z0-9_]+)/[^/]+\.py$", path)
    return m.group(1) if m else ""


class _CountingHandler(logging.Handler):
    def __init__(self, counter: Counter, name: str):
        super().__init__(logging.WARNING)
        self.counter, self.name_ = counter, name

    def emit(self, record):
        if self.name_ == "pydicom":  # pydicom's warn_and_log logs and warns the same text: count it once
            return
        self.counter[f"{self.name_}:log{record.levelname.lower()}: " +
                     " ".join(_TOKEN.findall(_QUOTED.sub(" ", record.getMessage()))[:MAX_KIND_WORDS])] += 1


@contextmanager
def counted_warnings(counter: Counter):
    """Record every warning raised inside into ``counter`` (kind -> n) instead of printing it."""
    loggers = [(logging.getLogger(n), n) for n in QUIET_LOGGERS]
    saved = [(lg, lg.propagate, list(lg.handlers)) for lg, _ in loggers]
    for lg, n in loggers:
        lg.propagate = False
        lg.handlers = [_CountingHandler(counter, n)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield counter
            finally:
                for w in caught:
                    counter[warning_kind(w.category, w.message, _module_of(w))] += 1
    finally:
        for lg, prop, handlers in saved:
            lg.propagate, lg.handlers = prop, handlers


@contextmanager
def counted_native_stderr(counter: Counter):
    """Count lines that C libraries (openjpeg inside gdcm, libjpeg) print straight to file descriptor 2.

    Python's warning machinery never sees those; left alone they print once per bad file. The descriptor is
    pointed at a temporary file for the duration (worker processes are single-threaded while they decode) and each
    line becomes a ``native:stderr`` kind.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to capture
        yield counter
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield counter
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    words = _TOKEN.findall(_QUOTED.sub(" ", line))[:MAX_KIND_WORDS]
                    counter["native:stderr: " + " ".join(words)] += 1
