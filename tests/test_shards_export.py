"""A messy hospital export: every test file pydicom, pydicom-data and nibabel ship, nested in patient/study folders
named like a PACS export's (names, MRNs, accession numbers). Compressed transfer syntaxes, DICOMDIRs, SR, RT,
overlays, broken headers (``badVR.dcm``: NumberOfFrames "1A"), Analyze/MINC/PAR files.

The build must finish (exit 0, no traceback), account for every input (written or skipped by reason), count
third-party warnings instead of printing them, show no raw folder name anywhere, and verify."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import require_real

from medfm.launch.cli import main as medfm_main
from medfm.pretrain.world_env import env_outside_world
from medfm.shards import realdata
from medfm.shards.deid import Pseudonymizer
from medfm.shards.verify import verify

SALT = "export-salt-0123456789"


@pytest.fixture(scope="module")
def export_build(tmp_path_factory):
    require_real(["dicom_ct", "dicom_radiograph", "nifti_anatomical"])
    src = tmp_path_factory.mktemp("export")
    realdata.write_messy_export(src)
    out = tmp_path_factory.mktemp("export_shards") / "out"
    env = {**env_outside_world(), "MEDFM_DEID_SALT": SALT}
    r = subprocess.run([sys.executable, "-m", "medfm.launch.cli", "shards", "build", str(src), "--out", str(out),
                        "--quiet", "--workers", "2"], capture_output=True, text=True, env=env, timeout=900)
    return src, out, r


def _run_build(src, out, capfd, monkeypatch, *extra):
    monkeypatch.setenv("MEDFM_DEID_SALT", SALT)
    rc = medfm_main(["shards", "build", str(src), "--out", str(out), "--quiet", "--workers", "2", *extra])
    return rc, capfd.readouterr()


def test_whole_export_builds_accounts_for_every_input_and_verifies(export_build):
    src, out, cap = export_build
    rc = cap.returncode
    assert rc == 0, cap.stderr[-3000:]
    cap.err = cap.stderr
    assert "Traceback" not in cap.err and "Traceback" not in cap.stdout
    files = [Path(d) / n for d, _, ns in os.walk(src) for n in ns if not n.startswith(".")]
    assert len(files) > 300
    manifest = json.loads((out / "manifest.json").read_text())
    inputs = manifest["sources"]["inputs"]
    assert inputs["files"] == len(files)
    assert inputs["written"] + inputs["skipped"] + inputs["companion"] + inputs["indexed"] == len(files), inputs
    assert inputs["written"] > 40 and manifest["totals"]["samples"] > 40
    assert manifest["skipped"].get("burned_in_annotation", 0) >= 10  # US, SC, OT not marked BurnedInAnnotation NO
    # every skip has a reason and exactly one log line
    skipped = manifest["skipped"]
    assert sum(skipped.values()) == len(manifest["skipped_inputs"]) == cap.err.count("\nskip ") + \
        cap.err.startswith("skip ")
    assert all(s["reason"] and s["source"] for s in manifest["skipped_inputs"])
    # the malformed header is one counted skip, named by field
    pseudo = Pseudonymizer(SALT.encode())
    by_source = {s["source"]: s for s in manifest["skipped_inputs"]}
    bad_vr = next(f for f in files if f.name == "badVR.dcm")
    rec = by_source[pseudo.path(str(bad_vr.relative_to(src)))]
    assert rec["reason"] == "bad_header" and "NumberOfFrames" in rec["message"]
    # DICOMDIRs: followed (their files are ingested once, as files) or skipped with their own reason
    for f in files:
        if f.name.upper().startswith("DICOMDIR"):
            assert by_source[pseudo.path(str(f.relative_to(src)))]["reason"] in ("dicomdir_index", "bad_dicomdir")
    # third-party warnings: counted per kind, never printed per file
    assert manifest["warnings"] and any(k.startswith("pydicom:") for k in manifest["warnings"])
    assert "UserWarning" not in cap.err and "warn_and_log" not in cap.err
    assert "Invalid number of tiles" not in cap.err  # openjpeg prints from C: counted as native:stderr
    # no raw folder name (patient names, MRNs, accession numbers) in logs, skip records or manifest
    text = cap.err + cap.stdout + (out / "manifest.json").read_text()
    for folder in realdata.EXPORT_PATIENTS + realdata.EXPORT_STUDIES:
        for piece in {folder, *folder.replace("^", " ").replace("_", " ").split()}:
            if len(piece) >= (6 if piece.isdigit() else 4):  # short digit runs occur in hex checksums by chance
                assert piece not in text, piece
    assert str(src) not in text
    problems, stats = verify(out)
    assert problems == [] and stats["samples"] == manifest["totals"]["samples"]
    assert medfm_main(["shards", "verify", str(out)]) == 0


def test_unwritable_output_is_one_line_exit_1(export_build, capfd, monkeypatch, tmp_path):
    src, _, _ = export_build
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, cap = _run_build(src / realdata.EXPORT_PATIENTS[0], blocker / "out", capfd, monkeypatch)
    assert rc == 1 and "Traceback" not in cap.err
    assert cap.err.strip().splitlines()[-1].startswith("medfm shards build: cannot write to")


def _header_values(ds, path=""):
    """(leaf keyword, value) of every attribute of ``ds``: standard, nested in sequences, private."""
    for el in ds:
        kw = el.keyword or f"({el.tag.group:04X},{el.tag.element:04X})"
        if el.VR == "SQ":
            for item in el.value or []:
                yield from _header_values(item, path + kw + ">")
            continue
        if el.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or el.tag == 0x7FE00010:
            continue
        try:
            values = list(el.value) if el.VM > 1 else [el.value]
        except Exception:
            continue
        for v in values:
            yield kw, str(v).strip()


def _distinctive(value: str) -> bool:
    # identifiers and codes, not plain lowercase words ("patient") nor short numbers that occur by chance
    return ((len(value) >= 5 and re.search(r"[A-Z0-9 ^]", value) is not None and re.search(r"[A-Za-z]", value)
             is not None) or (len(value) >= 8 and re.fullmatch(r"[\d.]+", value) is not None))


def test_only_allowlisted_header_fields_reach_shards_manifest_or_log(export_build):
    """Every attribute of every DICOM header in the export whose value appears in the output must be in
    deid.HEADER_FIELDS_IN_SHARDS (the documented allowlist)."""
    import pydicom

    from medfm.shards.deid import HEADER_FIELDS_IN_SHARDS
    from medfm.shards.verify import iter_tar_samples

    src, out, cap = export_build
    manifest = json.loads((out / "manifest.json").read_text())
    for k in ("config", "limits", "preprocessing"):  # the user's settings, not header values
        manifest.pop(k)
    text = json.dumps(manifest, ensure_ascii=False) + cap.stderr + cap.stdout
    for shard in sorted(out.glob("*.tar")):
        for m in iter_tar_samples(shard):
            text += m["meta.json"].decode() + m.get("text.txt", b"").decode()
    reached: dict[str, set] = {}
    scanned = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            values = list(_header_values(ds)) + list(_header_values(getattr(ds, "file_meta", None) or []))
        except Exception:
            continue
        scanned += 1
        # a value an allowlisted attribute of the same file also carries is explained by that attribute
        # (reportsi.dcm's observer PersonName and its report TextValue are both "Enter text")
        explained = {v for kw, v in values if kw in HEADER_FIELDS_IN_SHARDS}
        for kw, v in values:
            if kw not in HEADER_FIELDS_IN_SHARDS and v in explained:
                continue
            if _distinctive(v) and v in text and re.search(rf"(?<![A-Za-z0-9_]){re.escape(v)}(?![A-Za-z0-9_])", text):
                reached.setdefault(kw, set()).add(v)
    assert scanned > 200
    outside = {k: sorted(v)[:5] for k, v in reached.items() if k not in HEADER_FIELDS_IN_SHARDS}
    assert not outside, f"header attributes outside the allowlist reach the output: {outside}"
    assert "Modality" in reached  # the scan does see what is written


def test_a_worker_killed_by_a_native_crash_costs_one_input(tmp_path, monkeypatch):
    """A segfault in a decoder kills its worker process; with a plain multiprocessing.Pool the build waited forever.
    (MEDFM_INGEST_FAULT=crash:<name> makes the worker reading that file die by SIGSEGV.)"""
    import shutil

    from medfm.shards.deid import DeidConfig
    from medfm.shards.ingest import FAULT_ENV, IngestConfig, build

    require_real(["dicom_ct", "dicom_mr", "nifti_anatomical", "dicom_ecg"])
    src = tmp_path / "src"
    src.mkdir()
    for name in ("dicom_ct", "dicom_mr", "nifti_anatomical", "dicom_ecg"):
        shutil.copy(realdata.require(name), src / realdata.require(name).name)
    monkeypatch.setenv(FAULT_ENV, "crash:MR_small.dcm")
    cfg = IngestConfig(workers=2, deid=DeidConfig(salt=SALT))
    manifest = build([src], tmp_path / "out", cfg, progress=False, log=lambda m: None)
    assert manifest["skipped"] == {"worker_crashed": 1}
    assert manifest["totals"]["samples"] == 3 and verify(tmp_path / "out")[0] == []
