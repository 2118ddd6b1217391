"""``medfm recipes list`` and ``medfm recipes show NAME``: the YAML recipes that ship with medfm.

``show`` prints a recipe with its ``base:`` files merged in, i.e. what ``medfm launch NAME`` reads before the dotted
overrides (the run directory's ``config.yaml`` then adds the typed defaults). Any command that takes a config path
also takes a recipe name (medfm.configs.registry).
"""

from __future__ import annotations

import difflib

import yaml

from medfm.schema import ConfigError


def _list(args) -> int:
    from medfm.configs import registry

    rows = [(n, registry.kind(n), registry.summary(n)) for n in registry.names()]
    rows = [r for r in rows if args.kind is None or r[1] == args.kind]
    width = max((len(n) for n, _, _ in rows), default=0)
    for name, kind, text in rows:
        print(f"{name:<{width}}  {kind:<10}  {text}")
    return 0


def _show(args) -> int:
    from medfm.configs import registry
    from medfm.schema import read_yaml_mapping

    path = registry.find(args.name)
    if path is None:
        hint = difflib.get_close_matches(args.name, registry.names(), n=1, cutoff=0.5)
        raise ConfigError(f"no recipe named {args.name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + "; `medfm recipes list` names them")
    name = path.relative_to(registry.ROOT).with_suffix("").as_posix()
    data = read_yaml_mapping(path, includes=registry.kind(name) != "sweep")  # a sweep's base: is its run recipe
    own = [k for k in read_yaml_mapping(path, includes=False) if k in data]  # the file's own keys first, as written
    data = {**{k: data[k] for k in own}, **{k: v for k, v in data.items() if k not in own}}
    print(f"# {name} ({path})")
    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120).rstrip())
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("recipes", help="list / show the YAML recipes that ship with medfm",
                              description=__doc__)
    sub = p.add_subparsers(dest="recipes_command", metavar="COMMAND", parser_class=type(p))
    sub.required = True
    ls = sub.add_parser("list", help="every shipped recipe: name, kind (run, sweep, eval suite, ...), what it is")
    ls.add_argument("--kind", default=None, help="only this kind, e.g. run")
    ls.set_defaults(func=_list)
    sh = sub.add_parser("show", help="print a recipe with its base: includes merged")
    sh.add_argument("name", help="recipe name from `medfm recipes list`, e.g. tiny_cpu or pretrain/tiny_multimodal")
    sh.set_defaults(func=_show)
