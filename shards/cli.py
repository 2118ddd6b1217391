"""``medfm shards build|verify|inspect`` (contract in DESIGN.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medfm.schema import ConfigError, apply_overrides, from_dict, load_yaml


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("shards", help="ingest real medical files into WebDataset shards; verify; inspect")
    sub = p.add_subparsers(dest="shards_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser("build", help="read, de-identify and preprocess SOURCE files/folders into shards")
    b.add_argument("sources", nargs="+", metavar="SOURCE", help="files/folders to ingest")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set max_samples=500 "
                        "--set preprocess.volume.target_spacing=[2,2,2])")
    b.add_argument("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    b.add_argument("--config", help="ingest YAML (IngestConfig; see configs/ingest/)")
    b.add_argument("--workers", type=int, help="reader processes (default from config, 1)")
    b.add_argument("--allow-unsalted", action="store_true", help="tests only: pseudonyms with a public salt")
    b.add_argument("--no-deid", action="store_true", help="disable de-identification (needs --allow-identifiable)")
    b.add_argument("--allow-identifiable", action="store_true", help="accept identifiable output of --no-deid")
    b.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--part", metavar="I/N", help="build only this node's deterministic 1/N of the inputs "
                   "(a DICOM series stays whole); combine the parts with `medfm shards merge`")
    b.set_defaults(func=_build)

    m = sub.add_parser("merge", help="merge the shard sets of `build --part I/N` into one set with one manifest")
    m.add_argument("parts", nargs="+", metavar="PART_DIR")
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=_merge)

    v = sub.add_parser("verify", help="recompute checksums and decode every sample; exit 1 listing problems")
    v.add_argument("dir")
    v.set_defaults(func=_verify)

    i = sub.add_parser("inspect", help="counts per modality/split/reason, sizes, optional contact sheet")
    i.add_argument("dir")
    i.add_argument("--sheet", help="write a PNG contact sheet here")
    i.add_argument("--max-samples", type=int, default=48)
    i.set_defaults(func=_inspect)



def _config(args):
    from medfm.shards.ingest import IngestConfig

    overrides = list(args.overrides)
    data = load_yaml(args.config) if args.config else {}
    data = apply_overrides(data, overrides, IngestConfig)
    for flag, key in ((args.allow_unsalted, ("deid", "allow_unsalted")), (args.overwrite, ("overwrite",)),
                      (args.allow_identifiable, ("allow_identifiable",))):
        if flag:
            node = data
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = True
    if args.no_deid:
        data.setdefault("deid", {})["enabled"] = False
    if args.workers is not None:
        data["workers"] = args.workers
    if args.part:
        data["part"] = args.part
    return from_dict(IngestConfig, data)


def _without_partial_output(out: Path, work):
    """Run ``work``; if it fails to write (OSError, or the build's BuildError), remove what it added under ``out``
    (and ``out`` itself if it created it), so a failed build leaves nothing that looks like a shard set. The error
    goes on to the CLI."""
    from medfm.shards.ingest import BuildError

    existed = out.exists()
    before = set(out.iterdir()) if existed and out.is_dir() else set()
    try:
        return work()
    except (OSError, BuildError):
        import shutil

        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            for p in set(out.iterdir()) - before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _build(args) -> int:
    from medfm.shards.ingest import BuildError, build

    cfg = _config(args)
    try:
        manifest = _without_partial_output(Path(args.out), lambda: build(args.sources, args.out, cfg,
                                                                         progress=not args.quiet))
    except BuildError as exc:
        print(f"medfm shards build: {exc}", file=sys.stderr)
        return 1
    if not manifest["totals"].get("samples"):
        # Keep the record of why (skipped inputs by reason) but not as a shard set: an empty manifest.json would
        # look like a valid dataset and make the next build demand --overwrite.
        out = Path(args.out)
        os.replace(out / "manifest.json", out / "failed-build.json")
        print(f"medfm shards build: no usable input (every source was skipped; reasons in "
              f"{out / 'failed-build.json'})", file=sys.stderr)
        return 1
    return 0


def _merge(args) -> int:
    from medfm.shards.merge import merge

    manifest = merge(args.parts, args.out, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(f"merged {len(args.parts)} parts: {manifest['totals']['samples']} samples in "
          f"{len(manifest['shards'])} shards -> {args.out}", file=sys.stderr)
    return 0


def _verify(args) -> int:
    from medfm.shards.verify import verify

    problems, stats = verify(args.dir, progress=sys.stderr.isatty())
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}:")
        for p in problems:
            print(p)
        return 1
    print(f"ok: {stats.get('samples', 0)} samples in {stats.get('shards', 0)} shards verified")
    return 0


def _inspect(args) -> int:
    from medfm.shards.inspect import contact_sheet, summary
    from medfm.shards.manifest import ManifestError

    try:
        print(summary(args.dir))
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    if args.sheet:
        n = contact_sheet(args.dir, args.sheet, max_samples=args.max_samples)
        print(f"contact sheet: {n} samples -> {args.sheet}")
    return 0


