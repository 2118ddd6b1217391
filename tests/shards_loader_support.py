"""Small shard fixtures for the loader tests, and the torchrun worker those tests launch.

Written with the real medfm.shards.writer.DatasetWriter so the loader is tested on exactly what ingest produces.
Run as a script (under torchrun) it iterates a loader and writes what each rank saw to a JSON file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from medfm.shards.sample import Sample, make_meta
from medfm.shards.writer import DatasetWriter

MODS = ("image", "volume", "signal", "ehr", "text")


def make_sample(key: str, modalities=("image", "text"), split: str = "train", seed: int = 0,
                label: int | None = None) -> Sample:
    rng = np.random.default_rng(seed)
    extra = {}
    s = Sample(key=key)
    if "image" in modalities:
        s.image = rng.integers(0, 255, size=(8, 10, 1), dtype=np.uint8)
        extra["image"] = {"photometric": "MONOCHROME2", "bits": 8, "shape": [8, 10, 1]}
    if "volume" in modalities:
        s.volume = rng.integers(-1000, 1000, size=(4, 6, 6), dtype=np.int16)
        extra["volume"] = {"spacing": [2.0, 1.0, 1.0], "orientation": "RAS", "units": "HU", "shape": [4, 6, 6]}
    if "signal" in modalities:
        length = 20 + int(rng.integers(0, 20))
        s.signal = rng.standard_normal((2, length)).astype(np.float32)
        extra["signal"] = {"fs": 100.0, "leads": ["I", "II"], "units": ["mV", "mV"]}
    if "ehr" in modalities:
        n = 1 + int(rng.integers(0, 6))
        ev = np.zeros((n, 4), dtype=np.float32)
        ev[:, 0] = -np.arange(n)[::-1]
        ev[:, 1] = rng.integers(2, 10, size=n)
        ev[:, 2] = rng.standard_normal(n)
        ev[:, 3] = 1
        s.ehr = ev
        extra["ehr"] = {"vocab": "ehr"}
    if "text" in modalities:
        s.text = f"report of {key}"
    labels = {"idx": label} if label is not None else {}
    s.meta = make_meta(patient_id=f"p{key}", study_id=f"s{key}", split=split, source={"format": "test"},
                       modalities=[m for m in MODS if m in modalities], labels=labels, **extra)
    return s


def make_dataset(out_dir, n: int, prefix: str = "ds", modalities=("image", "text"), per_shard: int = 7,
                 splits=None) -> list[str]:
    """``n`` samples (keys ``<prefix>_<i>``) in shards of ``per_shard``; returns the keys."""
    keys = []
    with DatasetWriter(out_dir, prefix=prefix, max_samples=per_shard) as w:
        for i in range(n):
            key = f"{prefix}_{i}"
            split = splits[i] if splits is not None else "train"
            w.add(make_sample(key, modalities, split=split, seed=i, label=i))
            keys.append(key)
    return keys


# ------------------------------------------------------------------------------------------------------------------
# torchrun worker: python -m torch.distributed.run --standalone --nproc_per_node 2 THIS_FILE CONFIG.json


def _worker(config_path: str) -> None:
    import torch.distributed as dist

    from medfm.pretrain import collectives
    from medfm.shards.loader import build_loader

    spec = json.loads(Path(config_path).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = build_loader(spec["loader"])
    if spec.get("resume_state"):
        loader.load_state_dict(json.loads(Path(spec["resume_state"]).read_text())[str(rank)])
    steps = []
    snapshot = None
    stop_at = spec.get("stop_at")
    for _ in range(spec.get("epochs", 1)):
        for batch in loader:
            plan = batch["plan"]
            steps.append({"step": plan.step, "keys": batch["keys"], "group": plan.group,
                          "modalities": list(plan.modalities), "resampled": batch["resampled"].tolist(),
                          "present": {m: batch[f"{m}_present"].tolist() for m in plan.modalities}})
            if loader.step == spec.get("snapshot_at"):
                snapshot = loader.state_dict()
            if stop_at is not None and loader.step >= stop_at:
                break
        if stop_at is not None and loader.step >= stop_at:
            break
    gather = collectives.all_gather_objects
    out = {"rank": rank, "steps": steps, "counters": loader.counters.as_dict(),
           "all_counters": loader.all_counters(gather_objects=gather),
           "all_bad_in_order": loader.all_counters("bad_in_order", gather_objects=gather),
           "state": loader.state_dict(), "snapshot": snapshot,
           "steps_per_epoch": loader.steps_per_epoch}
    Path(spec["out"].format(rank=rank)).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(sys.argv[1])


# ------------------------------------------------------------------------------------------------------------------
# planted corruption


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add_shard_to_manifest(out_dir: Path, name: str, n: int) -> None:
    import hashlib

    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (out_dir / name).read_bytes()
    manifest["shards"].append({"name": name, "samples": n, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest(), "modalities": {"image": n},
                               "splits": {"train": n}})
    path.write_text(json.dumps(manifest))


def plant_corruption(out_dir) -> tuple[dict[str, int], dict[str, int]]:
    """Add broken shards to a dataset written by make_dataset; returns ``(bad, lost)``: the bad samples per reason
    met at read time, and the samples per reason the loader's check before step 1 leaves out (with
    ``on_missing_shard: skip``; the default refuses the set).

    One hand-made shard holds one sample of each content fault, a second shard is garbage bytes, and the last good
    shard of the dataset is truncated in the middle.
    """
    from medfm.shards.sample import encode_meta

    out_dir = Path(out_dir)
    bad: dict[str, int] = {}
    lost: dict[str, int] = {}

    def meta(key, mods, **extra):
        return encode_meta(make_meta(patient_id="p" + key, study_id="s" + key, split="train",
                                     source={"format": "test"}, modalities=mods, **extra))

    img_meta = {"image": {"photometric": "MONOCHROME2", "bits": 8, "shape": [8, 10, 1]}}
    good_img = _npy(np.zeros((8, 10, 1), np.uint8))
    members = []
    # bad .npy bytes
    members += [("bad_npy.meta.json", meta("bad_npy", ["image"], **img_meta)), ("bad_npy.image.npy", b"\x93NUMPYgarbage")]
    # NaN in a float signal
    sig = np.zeros((2, 20), np.float32)
    sig[0, 3] = np.nan
    members += [("nan.meta.json", meta("nan", ["signal"], signal={"fs": 100.0, "leads": ["I", "II"]})),
                ("nan.signal.npy", _npy(sig))]
    # wrong shape: a 2D image
    members += [("shape.meta.json", meta("shape", ["image"], **img_meta)),
                ("shape.image.npy", _npy(np.zeros((8, 10), np.uint8)))]
    # meta lists an image that is missing
    members += [("missing.meta.json", meta("missing", ["image", "text"], **img_meta)), ("missing.text.txt", b"x")]
    # a member of a modality the schema does not define
    members += [("unknown.meta.json", meta("unknown", ["image"], **img_meta)), ("unknown.image.npy", good_img),
                ("unknown.xray.npy", good_img)]
    for r in ("bad_npy", "nonfinite", "bad_shape", "missing_member", "unknown_modality"):
        bad[r] = bad.get(r, 0) + 1
    (out_dir / "zbad-000000.tar").write_bytes(_tar_bytes(members))
    _add_shard_to_manifest(out_dir, "zbad-000000.tar", 5)

    (out_dir / "zjunk-000000.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    _add_shard_to_manifest(out_dir, "zjunk-000000.tar", 4)
    lost["unreadable_shard"] = 4

    manifest = json.loads((out_dir / "manifest.json").read_text())
    victim = next(s for s in manifest["shards"] if s["samples"] >= 4 and not s["name"].startswith("z"))
    path = out_dir / victim["name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    lost["size_mismatch"] = victim["samples"]
    return bad, lost
