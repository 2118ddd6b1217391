"""The shipped recipes by name: ``tiny_cpu``, ``pretrain/tiny_multimodal``, ``evals/demo``, ... (the path below this
folder without ``.yaml``), so a recipe works from any directory once medfm is installed, checkout or not.

A path that exists always wins over a name (``medfm launch my.yaml``); a path that does not exist but names a
shipped recipe (``configs/tiny_cpu.yaml`` outside a checkout) resolves to the packaged copy, so the README's
commands work from anywhere. Reading (``base:`` includes, one-line errors) is medfm.schema's job, not this module's.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from medfm.configs import ROOT

SUFFIX = ".yaml"
# What each folder holds, i.e. which command takes it. Top-level files and pretrain/ are run configs (medfm launch /
# pretrain) unless they are sweeps; common/ holds the fragments recipes include with `base:`.
KINDS = {"common": "include", "evals": "eval suite", "evals/prompts": "prompts", "ingest": "ingest",
         "loader": "loader", "pretrain": "run", "": "run"}


def names() -> list[str]:
    """Every shipped recipe's name, sorted."""
    return sorted(p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.rglob(f"*{SUFFIX}"))


def _name_of(text: str) -> str:
    if text.startswith(("./", ".\\")):  # an explicit relative path is a file the user means, never a recipe name
        return ""
    name = text.replace("\\", "/").removesuffix(SUFFIX)
    return name[len("configs/"):] if name.startswith("configs/") else name


def find(name) -> Path | None:
    """The packaged file of recipe ``name`` (``tiny_cpu``, ``tiny_cpu.yaml`` or ``configs/tiny_cpu.yaml``), or None."""
    rel = _name_of(str(name))
    if not rel or rel.startswith("/") or ".." in Path(rel).parts:
        return None
    path = ROOT / f"{rel}{SUFFIX}"
    return path if path.is_file() else None


def locate(path_or_name) -> Path:
    """An existing file as given, else the shipped recipe it names, else the path unchanged (its reader then says
    it is missing)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    return find(path_or_name) or path


def kind(name: str) -> str:
    """run | sweep | eval suite | prompts | ingest | loader | include."""
    folder = Path(name).parent.as_posix().removeprefix(".")
    k = KINDS.get(folder, KINDS.get(folder.split("/")[0], "other"))
    if k == "run" and "sizes" in (yaml.safe_load((ROOT / f"{name}{SUFFIX}").read_text()) or {}):
        return "sweep"  # a sweep names its run recipe in its own `base:` field (launch/sweep.py), no include
    return k


def summary(name: str) -> str:
    """The first comment line of the recipe (what it is for)."""
    for line in (ROOT / f"{name}{SUFFIX}").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
