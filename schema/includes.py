"""``base:`` includes of YAML configs: a recipe names the files it builds on, so a shared block (the optimizer,
the tiny tower sizes, the cluster defaults) is written once.

    base: ../common/optim.yaml          # or a list; each path is relative to the file that names it
    optim: {lr: 3.0e-4}                 # the including file wins: mappings merge key by key, anything else
                                        # (lists included) is replaced whole; key order: see deep_merge

Bases apply in order (a later one wins over an earlier one), each with its own bases first; a cycle is a
ConfigError naming the chain. The merged mapping has no ``base`` key left, so what a run writes is the whole config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from medfm.schema.typed import ConfigError

BASE_KEY = "base"


def read_mapping_file(path: Path) -> dict:
    """The top-level mapping of one YAML file; ConfigError (one line) when missing or malformed."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (nor a shipped recipe: `medfm recipes list`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge recursively, every other value of ``child`` replaces base's.

    A mapping keeps its base's key order, keys new in the child appended; a child that restates every key of the
    base's mapping (``text: {}`` for an unchanged one) sets the order instead. Order matters for ``model.towers``:
    towers are built in that order, which decides their initialisation on a given seed."""
    order = list(child) if all(k in child for k in base) else [*base, *(k for k in child if k not in base)]
    out = {}
    for key in order:
        if key not in child:
            out[key] = base[key]
        elif isinstance(child[key], dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], child[key])
        else:
            out[key] = child[key]
    return out


def read_with_bases(path, _chain: tuple[Path, ...] = ()) -> dict:
    """The mapping at ``path`` merged over its ``base:`` files (recursively)."""
    path = Path(path)
    real = path.resolve()
    if real in _chain:
        loop = " -> ".join(p.name for p in (*_chain[_chain.index(real):], real))
        raise ConfigError(f"{_chain[0]}: base: include cycle {loop}")
    data = read_mapping_file(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of them (relative to this file), "
                          f"got {bases!r}")
    merged: dict = {}
    for name in bases:
        target = real.parent / name
        if not target.is_file():
            raise ConfigError(f"{path}: base: {name} not found (looked for {target})")
        merged = deep_merge(merged, read_with_bases(target, (*_chain, real)))
    return deep_merge(merged, data)
