"""DICOM pixel decoders on every compressed test file pydicom and pydicom-data ship: which plugin decodes what,
how fast, and whether the plugins agree.

    python benchmarks/decoders.py [--repeat 3]

Per transfer syntax and plugin: files decoded / files tried, and the summed median decode time over the files
*every* available plugin decodes (the same work for each, so the times compare), with the ratio to the fastest
plugin of that syntax measured in the same run. Pixel agreement: the plugins' arrays are compared file by file.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict

import numpy as np


def compressed_files():
    import pydicom
    from pydicom.uid import UID

    from medfm.shards import realdata

    out = []
    for _, tree in realdata.export_trees():
        for p in sorted(tree.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(p)
            except Exception:
                continue
            ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
            if ts is not None and UID(ts).is_compressed and "PixelData" in ds:
                out.append((p, ds, UID(ts)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from pydicom.pixels import get_decoder

    rows = defaultdict(lambda: defaultdict(lambda: {"ok": 0, "tried": 0, "times": {}}))
    disagree = []
    for path, ds, ts in compressed_files():
        dec = get_decoder(ts)
        arrays = {}
        for plugin in sorted(dec.available_plugins):
            cell = rows[ts.name][plugin]
            cell["tried"] += 1
            try:
                arr, _ = dec.as_array(ds, decoding_plugin=plugin)  # warm-up + result
                ts_ = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    dec.as_array(ds, decoding_plugin=plugin)
                    ts_.append(time.perf_counter() - t)
            except Exception:
                continue
            cell["ok"] += 1
            cell["times"][path.name] = statistics.median(ts_)
            arrays[plugin] = arr
        if len(arrays) > 1:
            ref_name, ref = next(iter(arrays.items()))
            for name, arr in arrays.items():
                if arr.shape != ref.shape or not np.array_equal(arr, ref):
                    diff = (np.abs(arr.astype(np.float64) - ref.astype(np.float64)).max()
                            if arr.shape == ref.shape else "shape")
                    disagree.append(f"{path.name}: {name} vs {ref_name}: max |diff| {diff}")
    print("| transfer syntax | plugin | decoded / tried | ms (files all plugins decode) | vs fastest |")
    print("|---|---|---|---|---|")
    for ts_name, plugins in sorted(rows.items()):
        common = set.intersection(*(set(c["times"]) for c in plugins.values())) if plugins else set()
        totals = {p: sum(c["times"][f] for f in common) * 1e3 for p, c in plugins.items()}
        best = min((v for v in totals.values() if v > 0), default=0)
        for p, c in sorted(plugins.items()):
            ratio = f"{totals[p] / best:.2f}x" if best and common else "-"
            print(f"| {ts_name} | {p} | {c['ok']} / {c['tried']} | {totals[p]:.1f} ({len(common)} files) | {ratio} |")
    print("\nplugin disagreements:" if disagree else "\nall plugins that decode a file give identical arrays")
    for d in disagree:
        print("  " + d)


if __name__ == "__main__":
    main()
