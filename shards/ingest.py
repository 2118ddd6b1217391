"""``medfm shards build``: real medical files -> de-identified, preprocessed WebDataset shards + manifest.

Pipeline (one direction, every stage testable alone):
  discover files -> plan tasks (a file, or the slices of one DICOM series) -> [worker processes] read + de-identify
  + preprocess -> [main process, task order] assign keys and EHR code ids -> DatasetWriter.
Workers only ever see one task at a time and results are consumed in task order, so the output is byte-identical
for the same inputs and config whatever ``--workers`` is. An input that cannot be used is skipped with a reason
(one log line each, counted in the manifest); the build itself never stops on one bad file.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.schema import ConfigError, to_dict
from medfm.shards.deid import DeidConfig, DeidError, Pseudonymizer, resolve_salt, scrub_text, stamp
from medfm.shards.labels import LabelSpec, apply_label_specs
from medfm.shards.manifest import DEFAULT_SPLIT_RATIOS, EHR_PAD, EHR_UNK, normalize_ratios, split_for
from medfm.shards.preprocess import (
    PreprocessConfig,
    PreprocessError,
    preprocess_image,
    preprocess_signal,
    preprocess_volume,
)
from medfm.shards.readers.base import ReadError, Record
from medfm.shards.sample import Sample, SampleError, make_meta
from medfm.shards.thirdparty_warnings import counted_native_stderr, counted_warnings
from medfm.shards.workers import resilient_map
from medfm.shards.writer import DatasetWriter

DICOM_EXT = (".dcm", ".dicom", ".ima")
NIFTI_EXT = (".nii", ".nii.gz")
TABLE_EXT = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SIGNAL_COMPANIONS = (".dat", ".atr", ".qrs", ".xws", ".hea-", ".ecg")  # data/annotation files next to a .hea


@dataclass
class EhrConfig:
    index_code: str | None = None      # events after the subject's first event with this code are dropped
    window_days: float | None = None   # keep events within this many days before the index time
    max_events: int = 4096
    label_codes: list[str] = field(default_factory=list)  # codes whose value becomes a label, not an input


@dataclass
class BurnedInConfig:
    """DICOM objects of modalities that often carry burned-in text (names, dates, MRNs in the pixels: ultrasound,
    secondary captures, screenshots, angiography) are skipped as ``burned_in_annotation`` unless the header says
    ``BurnedInAnnotation: NO`` or ``allow`` is set (for sources whose pixels were scrubbed upstream)."""

    allow: bool = False
    modalities: list[str] = field(default_factory=lambda: ["US", "SC", "OT", "XA", "XC", "ES", "GM", "DOC"])


@dataclass
class IngestConfig:
    prefix: str = "shard"
    max_samples: int = 1000            # per shard
    max_bytes: int = 256 * 1024 * 1024  # per shard
    workers: int = 1
    seed: int = 0                      # split assignment seed
    split_ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT_RATIOS))
    nifti_modality: str = "MR"         # NIfTI has no modality field: CT gets HU clipping, others normalisation
    overwrite: bool = False
    allow_identifiable: bool = False   # required together with deid.enabled=false
    deid: DeidConfig = field(default_factory=DeidConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ehr: EhrConfig = field(default_factory=EhrConfig)
    burned_in: BurnedInConfig = field(default_factory=BurnedInConfig)
    labels: list[LabelSpec] = field(default_factory=list)  # the only index columns that become labels
    part: str = ""                      # "I/N": this node's deterministic 1/N of the inputs (medfm shards merge)

    def validate(self):
        part_of(self.part)
        for spec in self.labels:
            spec.validate()
        if self.max_samples < 1 or self.max_bytes < 4096:
            raise ValueError("max_samples must be >= 1 and max_bytes >= 4096")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        normalize_ratios(self.split_ratios)
        if not self.prefix or "." in self.prefix or "/" in self.prefix:
            raise ValueError(f"prefix {self.prefix!r} must be a plain name without '.' or '/'")
        if self.nifti_modality not in ("CT", "MR", "PT", "NM"):
            raise ValueError(f"nifti_modality must be CT|MR|PT|NM, got {self.nifti_modality!r}")
        if not self.deid.enabled and not self.allow_identifiable:
            raise ValueError("deid.enabled=false writes identifiable shards: also set allow_identifiable=true")


def part_of(part: str) -> tuple[int, int] | None:
    """``"I/N"`` -> (I, N) with 1 <= I <= N; ``""`` -> None (the whole build)."""
    if not part:
        return None
    try:
        i, n = (int(x) for x in str(part).split("/"))
    except ValueError:
        raise ValueError(f"part must be I/N (e.g. 2/8), got {part!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"part {part!r}: need 1 <= I <= N")
    return i, n


def in_part(rel: str, part: tuple[int, int] | None) -> bool:
    """Whether the task (or planning skip) keyed ``rel`` belongs to ``part``: a hash of the key (a DICOM task's
    study UID, else its source-relative path), so every node agrees without talking to the others, and a series
    (one task) and a study's SR report stay whole."""
    if part is None:
        return True
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"medfm-part\x00{rel}".encode()).digest()[:8], "big")
    return h % part[1] == part[0] - 1


def sample_key(study: str, file_id: str) -> str:
    """``<study pseudonym>-<n>``: ``n`` is 10 hex of the sample's source pseudonym, so a key does not depend on
    which other inputs the build (or this part of it) saw; :func:`build` suffixes a repeat within a study."""
    import hashlib

    return f"{study}-{hashlib.sha256(file_id.encode()).hexdigest()[:10]}"


@dataclass
class Task:
    kind: str              # dicom | nifti | wfdb | edf | image_index | meds | image
    paths: list[Path]
    rel: str               # display / provenance path relative to its source root
    group: str = ""        # raw study UID for DICOM (in memory only): --part keeps a study together
    report: bool = False   # a DICOM SR: its text goes to the images of its study


# --- discovery ------------------------------------------------------------------------------------------------
def _has_dicm_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


@dataclass
class Discovery:
    """What planning found: tasks, inputs skipped at planning (rel, ReadError), and how every file is accounted."""

    tasks: list[Task]
    errors: list[tuple[str, ReadError]]
    files: int = 0          # distinct input files found (resolved paths)
    file_errors: int = 0    # of those, skipped at planning
    source_errors: int = 0  # errors[:source_errors] are missing sources / unreadable folders, not files
    companions: int = 0     # WFDB data/annotation files read through their .hea
    indexed: int = 0        # files named by an index table (read through its row)

    def __iter__(self):  # ``tasks, errors = discover(...)`` keeps working
        return iter((self.tasks, self.errors))


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def discover(sources, display=None) -> Discovery:
    """Files under ``sources`` -> tasks (sorted, deterministic) + inputs skipped at planning time.

    Never raises for one input: an unreadable folder, a table that does not parse, a DICOM header that does not
    parse all become planning skips. DICOMDIR indexes are followed: the files they reference join the inputs
    (once, however many indexes and folders name them). ``display(rel)`` is what messages show of a path.
    """
    from medfm.shards.readers.dicom import dicomdir_references, plan_tasks
    from medfm.shards.readers.tables import read_table, table_kind

    display = display or (lambda rel: rel)
    files: list[tuple[Path, Path]] = []
    errors: list[tuple[str, ReadError]] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            def walk_error(exc, src=src):
                rel = _rel(Path(exc.filename), src) if getattr(exc, "filename", None) else str(src)
                errors.append((rel, ReadError("unreadable_dir", f"{display(rel)}: {exc.strerror or exc}")))

            for dirpath, dirnames, names in os.walk(src, onerror=walk_error):
                dirnames.sort()
                files.extend((Path(dirpath) / n, src) for n in sorted(names) if not n.startswith("."))
        elif src.is_file():
            files.append((src, src.parent))
        else:
            errors.append((str(src), ReadError("missing_file", "no such file or directory")))
    n_source_errors = len(errors)
    seen, tasks, dicom, images, indexed = set(), [], [], [], set()
    roots: dict[Path, Path] = {}
    companions = 0
    i = 0
    while i < len(files):
        path, root = files[i]
        i += 1
        rp = path.resolve()
        if rp in seen:
            continue
        seen.add(rp)
        roots[path] = root
        rel = _rel(path, root)
        try:
            name = path.name.lower()
            if name.startswith("dicomdir") and (not Path(name).suffix or name.endswith(DICOM_EXT)):
                # an index of a DICOM file-set: follow it, then record the index itself
                refs = dicomdir_references(path)
                files.extend((r, root) for r in refs)
                errors.append((rel, ReadError("dicomdir_index", f"DICOMDIR index: {len(refs)} referenced files "
                                              "followed")))
            elif name.endswith(DICOM_EXT) or (not Path(name).suffix and _has_dicm_preamble(path)):
                dicom.append(path)
            elif name.endswith(NIFTI_EXT):
                tasks.append(Task("nifti", [path], rel))
            elif name.endswith(".hea"):
                tasks.append(Task("wfdb", [path], rel))
            elif name.endswith((".edf", ".bdf")):
                tasks.append(Task("edf", [path], rel))
            elif name.endswith(TABLE_EXT):
                df = read_table(path)
                kind = table_kind(df.columns)
                if kind is None:
                    errors.append((rel, ReadError("unknown_table", f"{display(rel)}: {len(df.columns)} columns, "
                                                  "neither MEDS (subject_id, time, code) nor an image index (path)")))
                    continue
                if kind == "image_index":
                    indexed.update((path.parent / str(p)).resolve() for p in df["path"].dropna())
                tasks.append(Task(kind, [path], rel))
            elif name.endswith(IMAGE_EXT):
                images.append(path)
            elif name.endswith(SIGNAL_COMPANIONS) and path.with_suffix(".hea").exists():
                companions += 1
            elif _has_dicm_preamble(path):
                dicom.append(path)
            else:
                errors.append((rel, ReadError("unsupported_format", "not a format medfm ingests")))
        except ReadError as exc:
            errors.append((rel, exc))
        except Exception as exc:  # planning must never end the build on one file
            errors.append((rel, ReadError("planning_error", _one_line(exc))))
    n_indexed = 0
    for path in images:  # bare images not named by an index become image-only samples
        if path.resolve() not in indexed:
            tasks.append(Task("image", [path], _rel(path, roots[path])))
        else:
            n_indexed += 1
    # a volume / signal file named by an index row is ingested through that row (with its labels and text), once
    kept = [t for t in tasks if t.kind not in ("nifti", "wfdb", "edf") or t.paths[0].resolve() not in indexed]
    n_indexed += len(tasks) - len(kept)
    tasks = kept
    info: dict = {}
    dtasks, derrs = plan_tasks(dicom, display=lambda p: display(_rel(p, roots[p])), info=info)
    tasks.extend(Task("dicom", t, _rel(t[0], roots[t[0]]), group=info.get(t[0], {}).get("study", ""),
                      report=bool(info.get(t[0], {}).get("report"))) for t in dtasks)
    errors.extend((_rel(p, roots[p]), e) for p, e in derrs)
    tasks.sort(key=lambda t: (not t.report, t.kind, t.rel))  # reports first: their text waits for the images
    return Discovery(tasks, errors, files=len(seen), file_errors=len(errors) - n_source_errors,
                     source_errors=n_source_errors,
                     companions=companions, indexed=n_indexed)


# --- worker side ---------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(cfg: IngestConfig, salt: bytes | None):
    _STATE["cfg"] = cfg
    _STATE["pseudo"] = Pseudonymizer(salt) if salt is not None else None


def _read_task(task: Task, cfg: IngestConfig, pseudo) -> list:
    from medfm.shards.readers.dicom import read_dicom
    from medfm.shards.readers.nifti import read_nifti
    from medfm.shards.readers.signals import read_edf, read_wfdb
    from medfm.shards.readers.tables import read_image_file, read_image_index, read_meds

    if task.kind == "dicom":
        return read_dicom(task.paths, task.rel, pseudo, cfg.deid,
                          burned_in=None if cfg.burned_in.allow else tuple(cfg.burned_in.modalities))
    if task.kind == "nifti":
        return read_nifti(task.paths[0], task.rel, cfg.nifti_modality)
    if task.kind == "wfdb":
        return read_wfdb(task.paths[0], task.rel)
    if task.kind == "edf":
        return read_edf(task.paths[0], task.rel)
    if task.kind == "image_index":
        return read_image_index(task.paths[0], task.rel, cfg.nifti_modality)
    if task.kind == "meds":
        e = cfg.ehr
        return read_meds(task.paths[0], task.rel, e.index_code, e.window_days, e.max_events, tuple(e.label_codes))
    if task.kind == "image":
        return read_image_file(task.paths[0], task.rel)
    raise ReadError("unsupported_format", f"{task.rel}: no reader for {task.kind}")


def _to_sample(rec: Record, cfg: IngestConfig, pseudo, stats: Counter | None = None) -> Sample:
    """Pseudonymise ids, scrub text, keep declared labels only, preprocess arrays; the key and EHR code ids are
    filled in by the main process. ``stats`` counts dropped label columns / rejected label values."""
    if pseudo is not None:
        patient = pseudo.patient(rec.patient)
        study = pseudo.study(rec.patient, rec.study)
        file_id = "f" + pseudo.pseudonym("file", rec.file)[:16]
    else:  # identifiable build (explicitly allowed): keep readable ids, keys still need a safe charset
        import hashlib

        patient, study = rec.patient, rec.study
        file_id = rec.file
        study = "s" + hashlib.sha256(f"{rec.patient}\x00{rec.study}".encode()).hexdigest()[:20] \
            if not study.replace("-", "").replace("_", "").isalnum() else study
    split = split_for(patient, cfg.split_ratios, cfg.seed)
    source = {"format": rec.format, "file": file_id}
    source.update({k: v for k, v in rec.info.items() if k in ("modality", "sop_class", "transfer_syntax")})
    scrub = scrub_text if (cfg.deid.enabled and cfg.deid.scrub_text) else None
    labels = apply_label_specs(rec.labels, cfg.labels, extra_declared=set(cfg.ehr.label_codes), terms=rec.phi_terms,
                               stats=stats, scrub=scrub)
    meta = make_meta(patient_id=patient, study_id=study, split=split, source=source, labels=labels)
    sample = Sample(key="", meta=meta)
    pre = cfg.preprocess
    if rec.volume is not None:
        arr, vmeta, applied = preprocess_volume(rec.volume, rec.volume_meta["spacing"],
                                                rec.volume_meta.get("modality", "MR"), pre.volume)
        meta["volume"] = {**vmeta, "orientation": rec.volume_meta["orientation"],
                          "modality": rec.volume_meta.get("modality")}
        meta["preprocessing"]["volume"] = applied
        sample.volume = arr
    if rec.image is not None:
        arr, imeta, applied = preprocess_image(rec.image, rec.image_meta.get("window"), pre.image)
        if rec.image_meta.get("pixel_spacing"):
            imeta["source_pixel_spacing"] = rec.image_meta["pixel_spacing"]
        meta["image"] = imeta
        meta["preprocessing"]["image"] = applied
        sample.image = arr
    if rec.signal is not None:
        arr, smeta, applied = preprocess_signal(rec.signal, rec.signal_meta["fs"], pre.signal)
        meta["signal"] = {"fs": smeta["fs"], "leads": list(rec.signal_meta["leads"]),
                          "units": list(rec.signal_meta["units"])}
        meta["preprocessing"]["signal"] = applied
        sample.signal = arr
    if rec.ehr_events is not None:
        meta["ehr"] = {"vocab": "ehr", "static": rec.ehr_meta.get("static", {}), "index": rec.ehr_meta.get("index")}
        meta["preprocessing"]["ehr"] = {"time": "days relative to index (<= 0)", "window_days": cfg.ehr.window_days,
                                        "max_events": cfg.ehr.max_events}
        sample.ehr = rec.ehr_events  # list of (t, code, value); converted with the global vocabulary in main
    if rec.text is not None:
        sample.text = scrub_text(rec.text, rec.phi_terms) if (cfg.deid.enabled and cfg.deid.scrub_text) else rec.text
    return sample


FAULT_ENV = "MEDFM_INGEST_FAULT"  # tests only: "crash:<file name>" kills the worker process reading that file


def _crashed(task: Task):
    return task, [("worker_crashed", "the reader process died (native crash) on this input")], Counter(), Counter()


def _process(task: Task):
    """Worker entry: (task, [Sample | (reason, message)], warnings Counter). Never raises for bad input: every
    exception while reading, de-identifying or preprocessing one input becomes a skip with a reason."""
    cfg, pseudo = _STATE["cfg"], _STATE["pseudo"]
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith("crash:") and any(p.name == fault[6:] for p in task.paths):
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)  # what a segfault in a C decoder does to the worker
    out: list = []
    warned: Counter = Counter()
    stats: Counter = Counter()
    with counted_warnings(warned), counted_native_stderr(warned):
        try:
            records = _read_task(task, cfg, pseudo)
        except ReadError as exc:
            return task, [(exc.reason, exc.message)], warned, stats
        except MemoryError:
            return task, [("out_of_memory", "input too large to read")], warned, stats
        except Exception as exc:  # a reader bug or an exotic file must cost one input, not the build
            return task, [("reader_error", _one_line(exc))], warned, stats
        for rec in records:
            if isinstance(rec, ReadError):
                out.append((rec.reason, rec.message))
                continue
            try:
                out.append(_to_sample(rec, cfg, pseudo, stats))
            except PreprocessError as exc:
                out.append((exc.reason, exc.message))
            except MemoryError:
                out.append(("out_of_memory", "input too large to preprocess"))
            except Exception as exc:
                out.append(("preprocess_error", _one_line(exc)))
    return task, out, warned, stats


# --- main process --------------------------------------------------------------------------------------------
class _Vocab:
    def __init__(self):
        self.codes = [EHR_PAD, EHR_UNK]
        self.ids = {c: i for i, c in enumerate(self.codes)}

    def id(self, code: str) -> int:
        if code not in self.ids:
            self.ids[code] = len(self.codes)
            self.codes.append(code)
        return self.ids[code]


def _ehr_array(events, vocab: _Vocab) -> np.ndarray:
    arr = np.zeros((len(events), 4), dtype=np.float32)
    for i, (t, code, value) in enumerate(events):
        arr[i] = (t, vocab.id(code), 0.0 if value is None else value, 0.0 if value is None else 1.0)
    return arr


def _label_summary(cfg: IngestConfig, stats: Counter) -> dict:
    """Manifest record of the label policy: declared labels, dropped columns and rejected values (names scrubbed:
    a column header can itself be identifying)."""
    def count(prefix):
        return {scrub_text(k[len(prefix):]): v for k, v in sorted(stats.items()) if k.startswith(prefix)}

    return {"declared": [to_dict(s) for s in cfg.labels] + [{"name": c, "type": "float", "from": "ehr.label_codes"}
                                                          for c in cfg.ehr.label_codes],
            "dropped_columns": count("label_dropped_column:"), "rejected_values": count("label_rejected:")}


class BuildError(RuntimeError):
    """The build itself cannot go on (the output cannot be written); exit 1 with this one line."""


def _redactor(task: Task, display):
    """message -> message without the task's raw paths or folder/file names (each replaced by its pseudonym)."""
    pairs: dict[str, str] = {}
    for path in task.paths:
        full = str(path)
        rel = task.rel if path == task.paths[0] else None
        if rel and full.endswith(rel):
            pairs[full] = display(rel)
            pairs[str(Path(full[: -len(rel)] or ".").resolve())] = "<source>"
        pairs[str(Path(full).resolve())] = display(task.rel) if rel else "<file>"
    parts = task.rel.replace("\\", "/").split("/")
    pairs[task.rel] = display(task.rel)
    for i, part in enumerate(parts):  # components alone too: readers quote file names
        if len(part) >= 3:
            pairs.setdefault(part, display("/".join(parts[: i + 1])).split("/")[-1])
    order = sorted(pairs, key=len, reverse=True)

    def redact(message: str) -> str:
        for raw in order:
            message = message.replace(raw, pairs[raw])
        return scrub_text(message)

    return redact


def build(sources, out_dir, cfg: IngestConfig, progress: bool = True, log=None) -> dict:
    """Build a shard directory; returns the manifest.

    Raises ConfigError for unusable settings (no salt, an existing output without overwrite) and BuildError when
    the output cannot be written; nothing about one input ever stops it (see :func:`_process`, :func:`discover`).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    salt = None
    salt_source = "none"
    if cfg.deid.enabled:
        try:
            salt, salt_source = resolve_salt(cfg.deid)
        except DeidError as exc:
            raise ConfigError(str(exc)) from None
    pseudo = Pseudonymizer(salt) if salt is not None else None
    display = pseudo.path if pseudo is not None else (lambda rel: rel)
    warned: Counter = Counter()
    with counted_warnings(warned):
        disc = discover(sources, display)
    part = part_of(cfg.part)
    tasks = [t for t in disc.tasks if in_part(t.group or t.rel, part)]
    plan_errors = [(rel, e) for rel, e in disc.errors if in_part(rel, part)]
    try:
        writer = DatasetWriter(out_dir, cfg.prefix, cfg.max_samples, cfg.max_bytes, overwrite=cfg.overwrite)
    except FileExistsError as exc:
        raise ConfigError(f"{exc}; pass --overwrite to replace it") from None
    except OSError as exc:
        raise BuildError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None

    def file_id(rel):
        return ("f" + pseudo.pseudonym("file", rel)[:16]) if pseudo else rel

    def skip(rel, reason, message, redact=None):
        message = redact(message) if redact else (scrub_text(message) if pseudo else message)
        log(f"skip {display(rel)}: {reason}: {message}")
        writer.skip(display(rel), reason, message)

    for rel, err in plan_errors:
        skip(rel, err.reason, err.message, _redactor(Task("planned", [Path(rel)], rel), display) if pseudo else None)
    vocab = _Vocab()
    per_study: Counter = Counter()
    formats: Counter = Counter()
    kinds: dict[str, int] = defaultdict(int)
    files_written = files_skipped = 0
    label_stats: Counter = Counter()
    reports: dict[str, list[Sample]] = {}  # study pseudonym -> its SR report samples
    attached: set[str] = set()

    def write(item: Sample, task: Task, redact) -> bool:
        base = sample_key(item.meta["study_id"], item.meta["source"]["file"])
        item.key = base if not per_study[base] else f"{base}x{per_study[base]}"
        per_study[base] += 1
        try:
            writer.add(item)
        except SampleError as exc:
            skip(task.rel, exc.reason, exc.message, redact=redact)
            return False
        except OSError as exc:
            raise BuildError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            skip(task.rel, "write_rejected", _one_line(exc), redact=redact)
            return False
        formats[item.meta["source"]["format"]] += 1
        return True

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="ingest", unit="task", disable=not progress, file=sys.stderr)
        if cfg.workers > 1 and len(tasks) > 1:
            # ordered (deterministic output); a worker killed by a native crash costs its task, not the build
            results = pool = resilient_map(_process, tasks, cfg.workers, _init_worker, (cfg, salt), _crashed)
        else:
            pool = None
            _init_worker(cfg, salt)
            results = map(_process, tasks)
        try:
            for task, outs, task_warned, task_stats in results:
                bar.update(1)
                warned.update(task_warned)
                label_stats.update(task_stats)
                kinds[task.kind] += 1
                redact = _redactor(task, display) if pseudo else None
                wrote = False
                for item in outs:
                    if isinstance(item, tuple):
                        skip(task.rel, *item, redact=redact)
                        continue
                    if isinstance(item.ehr, list):
                        item.ehr = _ehr_array(item.ehr, vocab)
                    if task.report:  # kept until the images of its study have been seen
                        reports.setdefault(item.meta["study_id"], []).append(item)
                        wrote = True
                        continue
                    study_reports = reports.get(item.meta["study_id"])
                    if study_reports and item.text is None:
                        item.text = "\n\n".join(r.text for r in study_reports)
                        attached.add(item.meta["study_id"])
                    wrote = write(item, task, redact) or wrote
                if wrote:
                    files_written += len(task.paths)
                else:
                    files_skipped += len(task.paths)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
        for study, items in reports.items():  # a report without images of its study: a text-only sample
            if study in attached:
                continue
            for item in items:
                write(item, Task("dicom", [], "report"), None)
    except BaseException:
        writer.abort()  # finished shards stay; the partial one is removed; no manifest claims a complete build
        raise
    cfg_dict = to_dict(cfg)
    if cfg_dict["deid"].get("salt"):
        cfg_dict["deid"]["salt"] = "<redacted>"
    if part is None:
        inputs = {"files": disc.files, "written": files_written, "skipped": files_skipped + disc.file_errors,
                  "companion": disc.companions, "indexed": disc.indexed}
    else:  # this part's share; companions / indexed files are counted once, by part 1
        n_file_errors = sum(1 for rel, _ in disc.errors[disc.source_errors:] if in_part(rel, part))
        inputs = {"written": files_written, "skipped": files_skipped + n_file_errors,
                  "companion": disc.companions if part[0] == 1 else 0,
                  "indexed": disc.indexed if part[0] == 1 else 0}
        inputs["files"] = sum(inputs.values())
    try:
        manifest = writer.close(
            deid=stamp(cfg.deid, salt_source),
            identifiable=not cfg.deid.enabled,
            preprocessing=to_dict(cfg.preprocess),
            vocabularies={"ehr": vocab.codes} if len(vocab.codes) > 2 else {},
            split={"by": "sha256(seed, patient pseudonym)", "seed": cfg.seed,
                   "ratios": normalize_ratios(cfg.split_ratios)},
            sources={"tasks": dict(sorted(kinds.items())), "samples_by_format": dict(sorted(formats.items())),
                     "skipped_at_planning": len(plan_errors), "inputs": inputs,
                     "reports": {"sr_documents": sum(len(v) for v in reports.values()),
                                 "studies_with_images": len(attached),
                                 "text_only": sum(len(v) for k, v in reports.items() if k not in attached)},
                     **({"part": cfg.part} if part else {})},
            warnings=dict(sorted(warned.items())),
            labels=_label_summary(cfg, label_stats),
            config=cfg_dict,
        )
    except OSError as exc:
        raise BuildError(f"cannot write the manifest in {out_dir}: {exc.strerror or exc}") from None
    t = manifest["totals"]
    log(f"wrote {t['samples']} samples in {len(manifest['shards'])} shards to {out_dir}; inputs: "
        + ", ".join(f"{k} {v}" for k, v in inputs.items())
        + f"; skipped by reason: {manifest['skipped']}"
        + (f"; {sum(warned.values())} third-party warnings of {len(warned)} kinds (manifest 'warnings')"
           if warned else ""))
    return manifest
