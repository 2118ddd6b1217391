"""Ingest throughput on the real sample files: volumes/s and images/s of ``medfm.shards.ingest.build``.

    python benchmarks/ingest.py [--repeat N] [--workers W]

Builds N copies (distinct SOP/series UIDs so none is deduplicated) of pydicom's CT_small + MR_small (volumes)
and N copies of the RG1 chest radiograph (images), then times the build end to end (read, de-identify,
preprocess, write, checksum). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pydicom

from medfm.shards import realdata
from medfm.shards.deid import DeidConfig
from medfm.shards.ingest import IngestConfig, build


def _copies(src: Path, out: Path, n: int, tag: str) -> None:
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i}"
        ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{i}"
        ds.PatientID = f"bench{i}"
        ds.save_as(out / f"{tag}{i:04d}.dcm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol_dir, img_dir = tmp / "vol", tmp / "img"
        vol_dir.mkdir()
        img_dir.mkdir()
        _copies(realdata.require("dicom_ct"), vol_dir, args.repeat, "ct")
        _copies(realdata.require("dicom_mr"), vol_dir, args.repeat, "mr")
        _copies(realdata.require("dicom_radiograph"), img_dir, max(1, args.repeat // 4), "cr")
        cfg = IngestConfig(workers=args.workers, deid=DeidConfig(salt="benchmark-salt-0000"))
        res = {"workers": args.workers}
        for name, src in (("volumes", vol_dir), ("images", img_dir)):
            t0 = time.perf_counter()
            man = build([src], tmp / f"out-{name}", cfg, progress=False, log=lambda m: None)
            dt = time.perf_counter() - t0
            n = man["totals"]["samples"]
            res[f"{name}"] = n
            res[f"{name}_per_s"] = round(n / dt, 2)
            res[f"{name}_mb_written"] = round(sum(s["bytes"] for s in man["shards"]) / 1e6, 2)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
