"""Labels are declared, never inferred: which index-table columns (or EHR label codes) become ``meta.labels``.

An export's index often carries columns nobody meant to publish (names, dates of birth, free-text notes). Only
columns declared in the ingest config (``labels: [{name, type, values}]``) reach the shards; every other column is
dropped and counted in the manifest (``labels.dropped_columns``). A declared value is converted to its type; one
outside ``values`` (when given) is dropped and counted; a declared string label is scrubbed like free text.
EHR ``label_codes`` (ehr config) are declared numeric labels, kept as the MEDS reader parsed them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LABEL_TYPES = ("int", "float", "bool", "str")
_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f"}


@dataclass
class LabelSpec:
    name: str
    type: str = "int"
    values: list[Any] = field(default_factory=list)  # allowed values ([] = any value of the type)

    def validate(self):
        if not self.name:
            raise ValueError("labels: a label needs a name")
        if self.type not in LABEL_TYPES:
            raise ValueError(f"labels.{self.name}.type must be one of {list(LABEL_TYPES)}, got {self.type!r}")


def _convert(value, typ: str):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if typ == "str":
        return str(value)
    if typ == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("not a boolean")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError("not finite")
    if typ == "int":
        if not f.is_integer():
            raise ValueError("not an integer")
        return int(f)
    return f


def apply_label_specs(labels: dict, specs: list[LabelSpec], extra_declared=(), terms=(), stats: Counter | None = None,
                      scrub=None) -> dict:
    """``labels`` (raw, from a reader) -> the declared labels only; counts dropped columns / rejected values in
    ``stats`` as ``label_dropped_column:<name>`` and ``label_rejected:<name>``."""
    stats = stats if stats is not None else Counter()
    by_name = {s.name: s for s in specs}
    out = {}
    for name, value in labels.items():
        spec = by_name.get(name)
        if spec is None and name in extra_declared:  # EHR label codes: numeric values as the reader parsed them
            out[name] = value
            continue
        if spec is None:
            stats[f"label_dropped_column:{name}"] += 1
            continue
        try:
            v = _convert(value, spec.type)
        except (TypeError, ValueError):
            stats[f"label_rejected:{name}"] += 1
            continue
        if v is None:
            continue
        if spec.values and v not in spec.values and str(v) not in {str(a) for a in spec.values}:
            stats[f"label_rejected:{name}"] += 1
            continue
        if spec.type == "str" and not spec.values and scrub is not None:
            v = scrub(v, terms)
        out[name] = v
    return out
