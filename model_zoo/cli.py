"""`medfm zoo list | show NAME[:V] | verify NAME[:V]` (the local model zoo; `medfm zoo release`, launch's, writes
into it)."""

from __future__ import annotations

import json

from medfm.schema import ConfigError


def _zoo(args):
    from medfm.model_zoo.zoo import Zoo

    return Zoo(args.zoo)


def _list(args) -> int:
    from medfm.model_zoo.release import ReleaseError

    try:
        rows = _zoo(args).list()
    except ReleaseError as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"zoo {_zoo(args).root}: empty")
        return 0
    print(f"{'name':30} {'version':10} {'added':25} summary")
    for r in rows:
        print(f"{r['name']:30} {r['version']:10} {r.get('added', ''):25} {r.get('summary', '')}")
    return 0


def _show(args) -> int:
    from medfm.model_zoo.release import ReleaseError

    try:
        info = _zoo(args).show(args.ref)
    except ReleaseError as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    towers = {m: s["arch"] for m, s in cfg["model"]["towers"].items()}
    n_tensors = len(cfg["weights"]["tensors"])
    print(f"{info['name']}:{info['version']}  ({info['dir']})")
    print(f"  towers: {towers}  embed_dim: {cfg['model']['embed_dim']}  tensors: {n_tensors}"
          f"  files: {cfg['weights']['files']}")
    print(f"  preprocessing: {json.dumps(cfg.get('preprocessing', {}))}")
    print()
    print(info["card"])
    return 0


def _verify(args) -> int:
    from medfm.model_zoo.release import ReleaseError, verify_release

    try:
        path = _zoo(args).resolve(args.ref)
    except ReleaseError as exc:
        raise ConfigError(str(exc)) from None
    problems = verify_release(path)
    for p in problems:
        print(p)
    print(f"{args.ref}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def add_cli(subparsers):
    zoo = subparsers.add_parser("zoo", help="the local model zoo: list / show / verify releases, release a checkpoint")
    zsub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zsub.required = True
    common = {"default": None, "help": "zoo directory (default $MEDFM_ZOO or ~/.cache/medfm/zoo)"}
    p = zsub.add_parser("list", help="every name:version in the zoo index")
    p.add_argument("--zoo", **common)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    p = zsub.add_parser("show", help="config summary and model card of NAME[:VERSION] (latest when omitted)")
    p.add_argument("ref")
    p.add_argument("--zoo", **common)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)
    p = zsub.add_parser("verify", help="checksums and per-tensor hashes of NAME[:VERSION]; exit 1 on problems")
    p.add_argument("ref")
    p.add_argument("--zoo", **common)
    p.set_defaults(func=_verify)
    return zsub  # launch/cli.py adds `zoo release` (it consolidates training checkpoints: not model_zoo's to import)
