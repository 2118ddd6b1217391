"""DICOM: CT/MR/PT series and multi-frame objects -> volume, radiographs/other 2D -> image, waveforms -> signal.

Every file is de-identified (shards/deid.py) right after it is read and before any field is looked at, so no meta
value can come from an identifying attribute. Pixel values are converted exactly as the standard says:
stored value x RescaleSlope + RescaleIntercept (per frame for enhanced objects), MONOCHROME1 inverted.
Compressed transfer syntaxes decode through pydicom's plugins (gdcm, pylibjpeg-openjpeg/-rle, Pillow: core dependencies; libjpeg for 12-bit JPEG via medfm[jpeg-gpl]), in the order of :data:`_PLUGIN_ORDER`; when no
handler can decode one the file is skipped with reason ``unsupported_transfer_syntax``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from medfm.shards.deid import DeidConfig, Pseudonymizer, deidentify_dicom, name_terms
from medfm.shards.readers.base import ReadError, Record
from medfm.shards.volume import ORIENTATION, dicom_affine_ras, to_canonical

VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
IMAGE_MODALITIES = {"CR", "DX", "MG", "RG", "US", "XA", "RF", "SC", "OT", "IO", "PX", "ES", "XC", "GM", "SM"}


def _read(path, stop_before_pixels=False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise ReadError("not_dicom", f"{exc}") from None
    except Exception as exc:  # truncated / corrupt headers raise many different errors
        raise ReadError("bad_dicom", f"{exc.__class__.__name__}: {exc}") from None


DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def _int_field(ds, keyword: str, default: int) -> int:
    """An integer header field; a malformed one is a clear skip (which field, what was expected), not a crash."""
    v = ds.get(keyword)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ReadError("bad_header", f"{keyword}: expected an integer") from None


def is_dicomdir(ds) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    return sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def header_summary(path) -> dict:
    """Cheap header read used by ingest to group single-frame slices into series (no pixel data loaded)."""
    ds = _read(path, stop_before_pixels=True)
    if is_dicomdir(ds):
        return {"dicomdir": True}
    iop = ds.get("ImageOrientationPatient")
    try:
        orientation = tuple(round(float(v), 4) for v in iop) if iop is not None and len(iop) == 6 else None
    except (TypeError, ValueError):
        raise ReadError("bad_header", "ImageOrientationPatient: expected 6 numbers") from None
    return {
        "dicomdir": False,
        "study": str(ds.get("StudyInstanceUID", "") or ""),
        "report": is_report(ds),
        "modality": str(ds.get("Modality", "")).upper(),
        "series": str(ds.get("SeriesInstanceUID", "")),
        "frames": _int_field(ds, "NumberOfFrames", 1) or 1,
        "waveform": "WaveformSequence" in ds,
        "shape": (_int_field(ds, "Rows", 0), _int_field(ds, "Columns", 0)),
        "orientation": orientation,
        "has_position": ds.get("ImagePositionPatient") is not None,
        "instance": str(ds.get("SOPInstanceUID", "")),
    }


def dicomdir_references(path: Path) -> list[Path]:
    """The files a DICOMDIR references (existing ones, in record order); raises ReadError for a broken index."""
    from pydicom.fileset import FileSet

    ds = _read(path)
    if not is_dicomdir(ds):
        raise ReadError("not_dicomdir", "not a DICOMDIR (no Media Storage Directory SOP class)")
    try:
        fs = FileSet(ds)
        refs = [Path(inst.path) for inst in fs]
    except Exception as exc:
        raise ReadError("bad_dicomdir", f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from None
    return [p for p in refs if p.is_file()]


def plan_tasks(paths: list[Path], display=str, info: dict | None = None) \
        -> tuple[list[list[Path]], list[tuple[Path, ReadError]]]:
    """Group DICOM files into tasks: one per parallel-slice series, one per other file. Returns (tasks, errors).

    Every exception while reading one header costs that file (``bad_header``), never the plan. A DICOMDIR is an
    index, not an image: its referenced files are ingested on their own (ingest follows them), the index itself is
    recorded as ``dicomdir_index``. ``display`` turns a path into what messages may show (pseudonymised).
    """
    groups: dict[tuple, list[Path]] = defaultdict(list)
    tasks, errors = [], []
    seen: dict[str, Path] = {}
    for p in sorted(paths):
        try:
            h = header_summary(p)
        except ReadError as exc:
            errors.append((p, exc))
            continue
        except Exception as exc:  # any malformed header: one skipped file
            errors.append((p, ReadError("bad_header", f"{exc.__class__.__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''}")))
            continue
        if h["dicomdir"]:
            errors.append((p, ReadError("dicomdir_index", "DICOMDIR index (its referenced files are ingested "
                                        "as files)")))
            continue
        if h["instance"] and h["instance"] in seen:  # same SOP instance twice (copies, re-encodings)
            errors.append((p, ReadError("duplicate_instance",
                                        f"same SOPInstanceUID as {display(seen[h['instance']])}")))
            continue
        seen[h["instance"]] = p
        if info is not None:
            info[p] = {"study": h["study"], "report": h["report"]}
        stackable = (h["modality"] in VOLUME_MODALITIES and h["frames"] == 1 and not h["waveform"]
                     and h["series"] and h["orientation"] is not None and h["has_position"])
        if stackable:
            groups[(h["series"], h["orientation"], h["shape"])].append(p)
        else:
            tasks.append([p])
    tasks.extend(sorted(groups.values()))
    tasks.sort(key=lambda t: str(t[0]))
    return tasks, errors


def _ids_and_terms(ds) -> tuple[str, str, list[str]]:
    patient = str(ds.get("PatientID", "") or "") or str(ds.get("PatientName", "") or "") or "unknown"
    study = str(ds.get("StudyInstanceUID", "") or ds.get("StudyID", "") or "")
    terms = name_terms(ds.get("PatientName"), ds.get("PatientID"), ds.get("OtherPatientIDs"),
                       ds.get("ReferringPhysicianName"), ds.get("InstitutionName"), ds.get("PatientBirthName"))
    return patient, study, terms


# Decoder plugin order per transfer syntax, fastest first as measured by benchmarks/decoders.py (the choice and the
# licences are in docs/notes/shards-ingest.md). A plugin that fails on a file hands it to the next one.
_PLUGIN_ORDER = {
    "JPEGBaseline8Bit": ("pillow", "gdcm", "pylibjpeg"),
    "JPEGExtended12Bit": ("pylibjpeg", "gdcm", "pillow"),  # 12-bit: only libjpeg (extra medfm[jpeg-gpl])
    "JPEGLossless": ("gdcm", "pylibjpeg"), "JPEGLosslessSV1": ("gdcm", "pylibjpeg"),
    "JPEGLSLossless": ("gdcm", "pylibjpeg"), "JPEGLSNearLossless": ("gdcm", "pylibjpeg"),
    "JPEG2000Lossless": ("pylibjpeg", "gdcm", "pillow"), "JPEG2000": ("pylibjpeg", "pillow", "gdcm"),
    "JPEG2000MCLossless": ("pylibjpeg", "gdcm", "pillow"), "JPEG2000MC": ("pylibjpeg", "pillow", "gdcm"),
    "RLELossless": ("pylibjpeg", "pydicom"),
}


def decoder_plugins(ts) -> list[str]:
    """Available decoding plugins for transfer syntax ``ts`` in medfm's order ([] = uncompressed / unknown)."""
    import pydicom.uid as uids
    from pydicom.pixels import get_decoder

    try:
        available = set(get_decoder(ts).available_plugins)
    except Exception:
        return []
    order = next((o for k, o in _PLUGIN_ORDER.items() if getattr(uids, k, None) == ts), ())
    return [p for p in order if p in available] + sorted(available - set(order))


def _pixels(ds, where: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError("no_pixel_data", f"{where}: no PixelData")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    plugins = decoder_plugins(ts) if ts is not None and getattr(ts, "is_compressed", False) else []
    errors = []
    for plugin in plugins or [""]:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except NotImplementedError as exc:
            errors.append(f"{plugin or 'pydicom'}: {str(exc).splitlines()[0]}")
            if not plugins:
                raise ReadError("unsupported_transfer_syntax", f"{where}: {ts.name if ts else '?'}: "
                                f"{errors[-1]}") from None
        except Exception as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            last = lines[-1] if lines else exc.__class__.__name__
            errors.append(last if last.startswith(f"{plugin}:") else f"{plugin or 'pydicom'}: {last}")
    if plugins and all("does not support" in e for e in errors):
        raise ReadError("unsupported_transfer_syntax", f"{where}: {ts.name}: no installed decoder supports it "
                        f"({'; '.join(errors)[:300]})")
    raise ReadError("bad_pixel_data", f"{where}: {'; '.join(errors)[:300]}")


def _rescale(arr: np.ndarray, slope, intercept) -> np.ndarray:
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    return arr.astype(np.float64) * slope + intercept


def _info(ds) -> dict:
    return {"modality": str(ds.get("Modality", "")), "sop_class": str(getattr(ds.get("SOPClassUID"), "name", "")),
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID.name) if "TransferSyntaxUID" in ds.file_meta else "",
            "manufacturer": str(ds.get("Manufacturer", "") or "")}


def burned_in_risk(ds, modalities) -> bool:
    """True when ``ds`` may carry burned-in text: a listed modality or a secondary capture / screenshot SOP class,
    and the header does not state ``BurnedInAnnotation: NO``."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "NO":
        return False
    sop = str(getattr(ds.get("SOPClassUID"), "name", "") or "")
    return (str(ds.get("Modality", "")).upper() in modalities or "Secondary Capture" in sop
            or "Screen" in sop or str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES")


def read_dicom(paths: list[Path], rel: str, pseudo: Pseudonymizer | None, deid: DeidConfig,
               burned_in: tuple[str, ...] | None = None) -> list[Record]:
    """Read one task (a file or a parallel-slice series) into records. ``burned_in``: modalities whose pixels are
    not ingested unless marked ``BurnedInAnnotation: NO`` (None = allow every object)."""
    datasets = []
    patient = study = None
    terms: list[str] = []
    for p in paths:
        ds = _read(p)
        if burned_in is not None and "PixelData" in ds and burned_in_risk(ds, burned_in):
            raise ReadError("burned_in_annotation", f"{rel}: modality {str(ds.get('Modality', '?'))} may carry "
                            "burned-in text (BurnedInAnnotation is not NO; set burned_in.allow to ingest)")
        pt, st, tm = _ids_and_terms(ds)
        if patient is None:
            patient, study = pt, st or Path(p).stem
        terms.extend(tm)
        if deid.enabled and pseudo is not None:
            try:
                deidentify_dicom(ds, pseudo, pt, deid)
            except Exception as exc:  # a value the profile cannot rewrite: the file is not used at all
                raise ReadError("deid_error", f"{exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        datasets.append(ds)
    ds0 = datasets[0]
    base = dict(format="dicom", file=rel, patient=patient, study=study, phi_terms=sorted(set(terms)), info=_info(ds0))
    modality = str(ds0.get("Modality", "")).upper()
    if is_report(ds0):
        return [_report(ds0, base, rel)]
    if "WaveformSequence" in ds0:
        return [_waveform(ds0, base, rel)]
    if modality in VOLUME_MODALITIES:
        if len(datasets) == 1 and _int_field(ds0, "NumberOfFrames", 1) > 1:
            return [_multiframe_volume(ds0, base, rel)]
        return [_series_volume(datasets, base, rel)]
    if modality in IMAGE_MODALITIES or ("PixelData" in ds0 and modality not in ("SEG", "RTDOSE", "RTSTRUCT", "SR")):
        return [_image(ds0, base, rel)]
    raise ReadError("unsupported_modality", f"{rel}: DICOM modality {modality or '?'} "
                    f"({_info(ds0)['sop_class'] or 'unknown SOP class'}) is not ingested")


def _series_volume(datasets, base, rel) -> Record:
    iop = [float(v) for v in datasets[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    normal = np.cross(iop[:3], iop[3:6])
    if len(datasets) > 1:
        pos = [np.asarray([float(v) for v in d.ImagePositionPatient]) for d in datasets]
        order = sorted(range(len(datasets)), key=lambda i: (float(pos[i] @ normal), int(datasets[i].get("InstanceNumber", 0) or 0)))
        datasets = [datasets[i] for i in order]
        pos = [pos[i] for i in order]
        dists = np.diff([float(p @ normal) for p in pos])
        if np.any(np.abs(dists) < 1e-4):
            raise ReadError("duplicate_slices", f"{rel}: two slices share a position")
        gaps = np.abs(dists)
        if gaps.max() - gaps.min() > max(0.01 * gaps.mean(), 1e-3):
            raise ReadError("irregular_slices", f"{rel}: slice gaps vary {gaps.min():.3f}..{gaps.max():.3f} mm")
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        thick = datasets[0].get("SpacingBetweenSlices") or datasets[0].get("SliceThickness") or 1.0
        step = normal * float(thick)
    first = datasets[0].get("ImagePositionPatient", [0, 0, 0])
    slices = []
    for d in datasets:
        px = _pixels(d, rel)
        if px.ndim != 2:
            raise ReadError("bad_shape", f"{rel}: expected 2D slices, got {px.shape}")
        slices.append(_rescale(px, d.get("RescaleSlope"), d.get("RescaleIntercept")))
    stack = np.stack(slices)  # [k, row j, col i]
    spacing = datasets[0].get("PixelSpacing", [1.0, 1.0])
    if any(float(s) <= 0 for s in spacing):
        raise ReadError("bad_geometry", f"{rel}: PixelSpacing {list(spacing)} must be positive")
    aff = dicom_affine_ras(iop, spacing, first, step)
    vol, sp = to_canonical(stack.transpose(2, 1, 0), aff)
    modality = str(datasets[0].get("Modality", "")).upper()
    return Record(**base, volume=vol, volume_meta={"spacing": sp, "orientation": ORIENTATION, "modality": modality,
                                                   "slices": len(datasets)})


def _first(seq_item, seq_name, attr):
    if seq_item is None or seq_name not in seq_item or not seq_item[seq_name].value:
        return None
    return seq_item[seq_name].value[0].get(attr)


def _multiframe_volume(ds, base, rel) -> Record:
    """Enhanced (multi-frame) CT/MR: geometry and rescale from the shared / per-frame functional groups."""
    frames = _pixels(ds, rel)
    n = _int_field(ds, "NumberOfFrames", 1)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[0] != n:
        raise ReadError("bad_shape", f"{rel}: {n} frames but pixel array {frames.shape}")
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per = list(ds.PerFrameFunctionalGroupsSequence) if "PerFrameFunctionalGroupsSequence" in ds else [None] * n

    def attr(i, seq, name, default=None):
        v = _first(per[i], seq, name)
        if v is None:
            v = _first(shared, seq, name)
        if v is None:
            v = ds.get(name)
        return default if v is None else v

    iop = [float(v) for v in attr(0, "PlaneOrientationSequence", "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    spacing = [float(v) for v in attr(0, "PixelMeasuresSequence", "PixelSpacing", [1.0, 1.0])]
    normal = np.cross(iop[:3], iop[3:6])
    pos = [attr(i, "PlanePositionSequence", "ImagePositionPatient") for i in range(n)]
    data = np.stack([_rescale(frames[i], attr(i, "PixelValueTransformationSequence", "RescaleSlope"),
                              attr(i, "PixelValueTransformationSequence", "RescaleIntercept")) for i in range(n)])
    if all(p is not None for p in pos) and n > 1:
        pos = [np.asarray([float(v) for v in p]) for p in pos]
        order = sorted(range(n), key=lambda i: float(pos[i] @ normal))
        d = np.diff([float(pos[i] @ normal) for i in order])
        if np.any(np.abs(d) < 1e-4):
            raise ReadError("not_a_stack", f"{rel}: frames share positions (time series / multi-stack not ingested)")
        data = data[order]
        step = (pos[order[-1]] - pos[order[0]]) / (n - 1)
        first = pos[order[0]]
    else:
        thick = attr(0, "PixelMeasuresSequence", "SliceThickness", 1.0)
        step, first = normal * float(thick), np.zeros(3)
    vol, sp = to_canonical(data.transpose(2, 1, 0), dicom_affine_ras(iop, spacing, first, step))
    return Record(**base, volume=vol, volume_meta={"spacing": sp, "orientation": ORIENTATION,
                                                   "modality": str(ds.Modality).upper(), "slices": n})


def _image(ds, base, rel) -> Record:
    px = _pixels(ds, rel)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if _int_field(ds, "NumberOfFrames", 1) > 1:
        px = px[len(px) // 2]  # a 2D cine/multi-frame image: keep the middle frame as the representative image
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if px.ndim != 2:
            raise ReadError("bad_shape", f"{rel}: monochrome image with shape {px.shape}")
        img = _rescale(px, ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
        window = None
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            wc, ww = ds.WindowCenter, ds.WindowWidth
            wc = float(wc[0] if hasattr(wc, "__len__") and not isinstance(wc, str) else wc)
            ww = float(ww[0] if hasattr(ww, "__len__") and not isinstance(ww, str) else ww)
            window = [wc, ww]
        if photometric == "MONOCHROME1":  # higher value = darker: invert so that bone is bright as in MONOCHROME2
            img = img.max() + img.min() - img
            if window is not None:
                window[0] = float(px.max() + px.min()) - window[0]
        meta = {"photometric_source": photometric, "window": window, "channels": 1}
        img = img[..., None]
    else:
        if photometric == "PALETTE COLOR" and px.ndim == 2:
            from pydicom.pixels import apply_color_lut

            px = apply_color_lut(px, ds)
        if px.ndim != 3 or px.shape[-1] != 3:
            raise ReadError("bad_shape", f"{rel}: colour image with shape {px.shape}")
        # pydicom >= 3 returns YBR_FULL/_422/ICT/RCT already converted to RGB (pixel_array's as_rgb=True):
        # converting again would be a second, wrong colour transform.
        img = px
        meta = {"photometric_source": photometric, "window": None, "channels": 3}
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is not None and all(float(v) > 0 for v in ps):
        meta["pixel_spacing"] = [float(v) for v in ps]
    meta["bits_stored"] = int(ds.get("BitsStored", 8) or 8)
    return Record(**base, image=np.asarray(img), image_meta=meta)


def _waveform(ds, base, rel) -> Record:
    """First multiplex group of a DICOM waveform (e.g. 12-lead ECG) with sensitivity/baseline applied."""
    try:
        arr = ds.waveform_array(0)  # samples x channels, in the channel sensitivity units
    except Exception as exc:
        raise ReadError("bad_waveform", f"{rel}: {exc.__class__.__name__}: {exc}") from None
    group = ds.WaveformSequence[0]
    leads, units = [], []
    for ch in group.ChannelDefinitionSequence:
        src = ch.get("ChannelSourceSequence")
        leads.append(str(src[0].get("CodeMeaning", "")) if src else f"ch{len(leads)}")
        us = ch.get("ChannelSensitivityUnitsSequence")
        units.append(str(us[0].get("CodeValue", "")) if us else "")
    fs = float(group.SamplingFrequency)
    return Record(**base, signal=np.asarray(arr, dtype=np.float64).T,
                  signal_meta={"fs": fs, "leads": leads, "units": units})


# --- structured reports ------------------------------------------------------------------------------------------
# Content items whose concept names one of these is observation context (who observed, for whom, where), never
# report text: observer names, organisations, subject ids. PNAME/DATE/TIME/DATETIME/UIDREF items are never read.
_SR_CONTEXT_WORDS = ("observer", "context", "organization", "organisation", "institution", "person", "subject", "name",
                     "procedure reported", "device", "uid")
_SR_VALUE_TYPES = ("TEXT", "CODE", "NUM", "CONTAINER")


def is_report(ds) -> bool:
    """A DICOM Structured Report (Basic Text / Enhanced / Comprehensive SR, ...)."""
    sop = str(getattr(ds.get("SOPClassUID"), "name", "") or "")
    return str(ds.get("Modality", "")).upper() == "SR" or sop.endswith("SR Storage") or "SR Storage" in sop


def _concept(item) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].get("CodeMeaning", "") or "") if seq else ""


def sr_text(ds) -> str:
    """The report text of an SR document: TEXT values, CODE meanings and NUM values with units, depth-first in
    document order, each as ``concept: value``; container concepts become section headings."""
    lines: list[str] = []

    def walk(items, depth):
        for item in items or []:
            vt = str(item.get("ValueType", "") or "").upper()
            concept = _concept(item)
            if vt not in _SR_VALUE_TYPES or any(w in concept.lower() for w in _SR_CONTEXT_WORDS):
                continue
            value = ""
            if vt == "TEXT":
                value = str(item.get("TextValue", "") or "").strip()
            elif vt == "CODE":
                seq = item.get("ConceptCodeSequence")
                value = str(seq[0].get("CodeMeaning", "") or "") if seq else ""
            elif vt == "NUM":
                seq = item.get("MeasuredValueSequence")
                if seq:
                    units = seq[0].get("MeasurementUnitsCodeSequence")
                    unit = str(units[0].get("CodeValue", "") or "") if units else ""
                    value = f"{seq[0].get('NumericValue', '')} {unit}".strip()
            if vt == "CONTAINER":
                if concept and depth > 0:
                    lines.append(f"{concept.upper()}:")
            elif value:
                lines.append(f"{concept}: {value}" if concept else value)
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    walk(ds.get("ContentSequence"), 0)
    return "\n".join(lines)


def _report(ds, base, rel) -> Record:
    try:
        text = sr_text(ds)
    except Exception as exc:
        raise ReadError("bad_report", f"{rel}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    if not text.strip():
        raise ReadError("empty_report", f"{rel}: structured report without text, code or numeric content")
    return Record(**{**base, "info": {**base["info"], "report": True}}, text=text)
