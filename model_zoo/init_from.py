"""Pretrained initialisation (``model.init_from`` / ``model.towers.<m>.init_from``), also under ZeRO-3.

A source is one of: a local Hugging Face directory or ``pkg:<module>/<dir>`` spec (safetensors inside), a
``.safetensors`` file, a model-zoo release (``NAME[:VERSION]`` or its directory), or a medfm training checkpoint
(run dir, ``checkpoints/`` or ``stepN``). ``open_source`` gives a lazy name -> tensor view of it (safetensors are
read one tensor at a time); ``load_into`` copies it into a built module **module by module**: each sub-module's own
parameters are gathered (``layers.whole_params``; a no-op unless deepspeed.zero.Init partitioned them), rank 0
copies its tensors in, and leaving the gather scatters rank 0's values to every rank — what transformers'
DeepSpeed integration does in ``from_pretrained``. So no rank ever holds more than one module's whole weights beyond
what the source itself needs (a medfm checkpoint is consolidated on the reading rank(s); the others are lazy).

Key names are matched by the prefix pair (strip from the source, add for the target) that matches the most keys,
so a tower takes a release's ``towers.<m>.*``, a checkpoint's ``model.towers.<m>.*``, a tower-only file, or an HF
directory's ``bert.*`` / bare names. Missing and unexpected keys are reported in one line; a shape mismatch is an
error naming the key. Buffers are not loaded: medfm's are recomputed from the config (sin-cos tables, ids).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medfm.model_zoo.layers import whole_params


class InitFromError(ValueError):
    """A source that does not exist, cannot be read, or does not fit the module (one line, naming it)."""


@dataclass
class WeightSource:
    """Lazy ``name -> tensor`` over one source: ``index`` holds every name's shape, ``read`` fetches one tensor."""

    where: str
    index: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    base_prefixes: tuple[str, ...] = ()  # extra source prefixes to try (an HF model's base_model_prefix, "bert.")


def _safetensors_files(files: list[Path], where: str, prefix: str = "") -> WeightSource:
    """Several safetensors files seen as one source (names get ``prefix``); only headers are read up front."""
    from safetensors import safe_open

    index, owner, handles = {}, {}, {}
    for f in sorted(set(files)):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                index[prefix + k] = tuple(h.get_slice(k).get_shape())
                owner[prefix + k] = (f, k)

    def read(name: str) -> torch.Tensor:
        f, k = owner[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(k)

    return WeightSource(where, index, read)


def _hf_dir_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / f for f in json.loads(index.read_text())["weight_map"].values()]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    raise InitFromError(f"init_from {d}: no model.safetensors (or index) in this directory; medfm loads "
                        "safetensors only, never pickled .bin weights")


def _hf_source(d: Path, where: str) -> WeightSource:
    src = _safetensors_files(_hf_dir_files(d), where)
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    model_type = cfg.get("model_type")  # HF checkpoints may nest the encoder under its base_model_prefix
    src.base_prefixes = tuple(dict.fromkeys(p for p in (f"{model_type}." if model_type else "", "bert.") if p))
    return src


def _release_source(root: Path, where: str) -> WeightSource:
    from medfm.model_zoo.release import TEXT_PREFIX, read_release_config

    meta = read_release_config(root)
    src = _safetensors_files([root / f for f in meta["weights"]["files"]], where)
    if meta.get("text_tower"):
        text = _safetensors_files(_hf_dir_files(root / meta["text_tower"]), where, prefix=TEXT_PREFIX)
        src.index.update(text.index)
        main_read, text_read = src.read, text.read
        src.read = lambda k: text_read(k) if k.startswith(TEXT_PREFIX) and k in text.index else main_read(k)
    tied = {a: t for a, t in meta["weights"].get("tied", {}).items() if t in src.index and a not in src.index}
    if tied:  # a release stores a tied tensor once; its aliases read the stored one
        src.index.update({a: src.index[t] for a, t in tied.items()})
        stored = src.read
        src.read = lambda k: stored(tied.get(k, k))
    return src


def _checkpoint_source(path: Path, where: str) -> WeightSource:
    from medfm.model_zoo.checkpoint_io import consolidate, find_checkpoint, model_state_dict

    root, tag = find_checkpoint(path)
    sd = model_state_dict(consolidate(root, tag))  # refuses any file that would need unpickling
    return WeightSource(f"{where} ({tag})", {k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__)


def open_source(spec: str, zoo=None) -> WeightSource:
    """The weights ``spec`` names (see the module docstring); InitFromError (one line) when there are none."""
    from medfm.model_zoo.checkpoint_io import is_checkpoint
    from medfm.model_zoo.text import resolve_local_dir

    where = f"init_from {spec}"
    try:
        if spec.startswith("pkg:"):
            return _hf_source(resolve_local_dir(spec), where)
        p = Path(spec).expanduser()
        if p.is_file():
            if p.suffix != ".safetensors":
                raise InitFromError(f"{where}: a weights file must be .safetensors (pickled weights are never "
                                    "loaded)")
            return _safetensors_files([p], where)
        if p.is_dir():
            if is_checkpoint(p):
                return _checkpoint_source(p, where)
            cfg = p / "config.json"
            if cfg.is_file() and json.loads(cfg.read_text()).get("format") == "medfm-release":
                return _release_source(p, where)
            if cfg.is_file():
                return _hf_source(p, where)
            raise InitFromError(f"{where}: {p} is neither a Hugging Face directory (config.json), a release, nor a "
                                "medfm checkpoint")
        if "/" not in spec and not spec.endswith(".safetensors"):  # NAME[:VERSION] in the zoo
            from medfm.model_zoo.zoo import Zoo

            return _release_source(Zoo(zoo).resolve(spec), where)
        raise InitFromError(f"{where}: no such file or directory")
    except InitFromError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InitFromError(f"{where}: {msg}") from None


# ---------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    where: str
    target: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def line(self) -> str:
        def few(names):
            return f"{len(names)} {names[:4]}{' ...' if len(names) > 4 else ''}"

        return (f"{self.where} -> {self.target}: {self.loaded} tensors loaded; missing {few(self.missing)}; "
                f"unexpected {few(self.unexpected)}")


def _params(module: nn.Module):
    """(sub-module, [(full name, param)]) for every sub-module's own parameters, each parameter once, in order."""
    seen = set()
    for mname, mod in module.named_modules():
        own = []
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                own.append((f"{mname}.{pname}" if mname else pname, p))
        if own:
            yield mod, own


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def plan(module: nn.Module, source: WeightSource, target: str, prefix_hint: str = "") -> tuple[dict, LoadReport]:
    """(target name -> source name, report) — the same on every rank, before any collective. Shape mismatch:
    InitFromError naming the key."""
    names = {n: _shape(p) for _, own in _params(module) for n, p in own}
    buffers = {n for n, _ in module.named_buffers()}
    buffers |= {n for n, _ in module.named_parameters(remove_duplicate=False)} - set(names)  # tied aliases
    strips = ["", "model.", *([prefix_hint, "model." + prefix_hint] if prefix_hint else []), *source.base_prefixes]
    best, best_hits = ("", ""), -1
    for strip in dict.fromkeys(strips):
        for add in ("", "model."):
            hits = sum(1 for k in source.index if k.startswith(strip) and add + k[len(strip):] in names)
            if hits > best_hits:
                best, best_hits = (strip, add), hits
    strip, add = best
    if best_hits <= 0:
        raise InitFromError(f"{source.where}: no tensor matches {target} (source has e.g. "
                            f"{sorted(source.index)[:3]}, {target} has e.g. {list(names)[:3]})")
    mapping, report = {}, LoadReport(source.where, target)
    for k, shape in source.index.items():
        t = add + k[len(strip):] if k.startswith(strip) else None
        if t in names:
            if tuple(shape) != names[t]:
                raise InitFromError(f"{source.where}: tensor '{k}' has shape {list(shape)}, {target}.{t} expects "
                                    f"{list(names[t])}")
            mapping[t] = k
        elif t not in buffers and k.startswith(strip):  # (other towers' tensors, buffers, aliases: expected)
            report.unexpected.append(k)
    report.missing = [n for n in names if n not in mapping]
    report.loaded = len(mapping)
    return mapping, report


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_into(module: nn.Module, source: WeightSource, target: str, prefix_hint: str = "",
              log: Callable[[str], None] | None = None) -> LoadReport:
    """Copy ``source`` into ``module``'s parameters, module by module (gather -> rank 0 copies -> scatter under
    zero.Init; every rank copies its own replica otherwise). A collective when parameters are partitioned: every
    rank calls it with the same module and an equal source index."""
    mapping, report = plan(module, source, target, prefix_hint)
    rank = _rank()
    for _, own in _params(module):
        todo = [(p, mapping[n]) for n, p in own if n in mapping]
        if not todo:
            continue
        with whole_params([p for p, _ in todo]), torch.no_grad():  # one module's parameters whole at a time
            for p, src in todo:
                if rank == 0 or not hasattr(p, "ds_id"):  # partitioned: leaving the gather scatters rank 0's
                    p.data.copy_(source.read(src).to(p.dtype))
    if log is not None and rank == 0:
        log(report.line())
    return report


def _partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def open_on_ranks(spec: str, partitioned: bool, broadcast: Callable | None, zoo=None) -> WeightSource:
    """``open_source`` as the ranks of a partitioned build need it: with ``broadcast`` (rank 0's object on every
    rank), a medfm checkpoint is consolidated on rank 0 only and the other ranks get its index (they never read a
    tensor: rank 0's values are scattered). File sources are opened lazily everywhere (headers only)."""
    from medfm.model_zoo.checkpoint_io import is_checkpoint

    if not (partitioned and broadcast is not None and is_checkpoint(Path(spec).expanduser())):
        return open_source(spec, zoo)
    src, err = None, None
    if _rank() == 0:
        try:
            src = open_source(spec, zoo)
        except InitFromError as exc:
            err = str(exc)
    where, index, err = broadcast((src.where, src.index, None) if src else (None, None, err))
    if err:
        raise InitFromError(err)
    if src is not None:
        return src

    def read(name):
        raise RuntimeError("only rank 0 reads a partitioned init_from source")

    return WeightSource(where, index, read)


def apply_init_from(model: nn.Module, cfg, log: Callable[[str], None] | None = None,
                    broadcast: Callable | None = None, zoo=None) -> list[LoadReport]:
    """``cfg.init_from`` into the whole MultiModalModel, then each ``cfg.towers[m].init_from`` into its tower
    (so a tower's source wins over the whole model's). Returns one LoadReport per source."""
    reports = []
    jobs = [(getattr(cfg, "init_from", None), model, "model", "")]
    jobs += [(spec.init_from, model.towers[m], f"towers.{m}", f"towers.{m}.")
             for m, spec in cfg.towers.items() if getattr(spec, "init_from", None)]
    for spec, module, target, hint in jobs:
        if not spec:
            continue
        source = open_on_ranks(spec, _partitioned(module), broadcast, zoo)
        reports.append(load_into(module, source, target, hint, log))
    return reports


def check_sources(cfg, zoo=None) -> list[str]:
    """Problems (one line each) with the init_from sources of a MultiModalConfig, without loading a tensor."""
    from medfm.model_zoo.checkpoint_io import is_checkpoint

    problems = []
    specs = [("model.init_from", getattr(cfg, "init_from", None))]
    specs += [(f"model.towers.{m}.init_from", s.init_from) for m, s in cfg.towers.items()]
    for field_name, spec in specs:
        if not spec:
            continue
        if is_checkpoint(Path(spec).expanduser()):
            from medfm.model_zoo.checkpoint_io import find_checkpoint

            try:
                find_checkpoint(Path(spec).expanduser())
            except ValueError as exc:
                problems.append(f"{field_name}: {exc}")
            continue
        try:
            open_source(spec, zoo)
        except InitFromError as exc:
            problems.append(f"{field_name}: {exc}")
    return problems
