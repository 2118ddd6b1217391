"""Release format and loading: a self-describing directory that rebuilds the model without pickle.

```
<release>/
  config.json            format + version, the MultiModalConfig, preprocessing, per-tensor dtype/shape/sha256
  model.safetensors      every tensor except the text tower's (or model-0000i-of-0000n.safetensors + index)
  model.safetensors.index.json   (only when sharded; Hugging Face layout: {"metadata", "weight_map"})
  text/                  the text tower as a plain Hugging Face directory (config, safetensors, and the tokenizer
                         files when it is a Hugging Face one), so transformers.AutoModel.from_pretrained(<release>/text)
                         works as-is; config.json's "tokenizer" is the exact spec it was trained with
                         (medfm.model_zoo.tokenizers: bytes, or hf files + sha256); a text tower without one is refused
  README.md              model card (content supplied by `medfm release`)
  checksums.sha256       `sha256sum -c` compatible list of every other file
```

A release is written into a temporary sibling directory and renamed into place only when complete, so a crash
never leaves a half-written release and an existing one is never clobbered (unless ``overwrite=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medfm.model_zoo.tokenizers import TokenizerError, check_spec, spec_directory, tokenizer_files, tokenizer_spec
from medfm.schema import ConfigError, from_dict, to_dict

FORMAT = "medfm-release"
FORMAT_VERSION = 1
TEXT_PREFIX = "towers.text.model."
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CHECKSUMS = "checksums.sha256"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class ReleaseError(ValueError):
    """A release that cannot be written or loaded; the message names the file and/or tensor at fault."""


# -- hashing ------------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


# -- model card ---------------------------------------------------------------------------------------------------
def render_card(card: str | dict | None, title: str = "medfm model") -> str:
    """A str card is used verbatim; a dict becomes Markdown sections (dict values -> tables, lists -> bullets)."""
    if card is None:
        return f"# {title}\n"
    if isinstance(card, str):
        return card if card.endswith("\n") else card + "\n"
    if not isinstance(card, dict):
        raise ReleaseError(f"card: expected a str or dict, got {type(card).__name__}")
    lines = [f"# {card.get('title', title)}", ""]
    for key, value in card.items():
        if key == "title":
            continue
        lines += [f"## {key.replace('_', ' ').capitalize()}", ""]
        if isinstance(value, dict):
            lines += ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            lines += [f"- {v}" for v in value]
        else:
            lines.append(str(value))
        lines.append("")
    return "\n".join(lines)


# -- saving -------------------------------------------------------------------------------------------------------
def _split_state(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without the HF text tower, with tied (shared-storage) tensors stored once: (tensors, aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if name.startswith(TEXT_PREFIX):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu().clone()
    return tensors, aliases


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _write_checksums(root: Path) -> None:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        lines.append(f"{sha256_file(path)}  {path.relative_to(root).as_posix()}")
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n")


def save_release(
    directory: str | os.PathLike,
    model,
    config=None,
    card: str | dict | None = None,
    preprocessing: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    extra: dict | None = None,
    tokenizer: dict | None = None,
) -> Path:
    """Write ``model`` (a MultiModalModel) as a release directory; returns its path.

    ``config``: the MultiModalConfig (or its dict) that rebuilds the towers (default: ``model.config``).
    ``preprocessing``: what inputs must look like (e.g. the shard manifest's preprocessing spec, image mean/std,
    sampling rate, EHR vocabulary); stored verbatim in config.json. ``extra``: more JSON-safe provenance (training
    manifest hash, step, ...), stored under ``"provenance"``. ``tokenizer``: the text tower's tokenizer spec
    (``medfm.model_zoo.tokenizers.tokenizer_spec``, what training used); None = the tower's own Hugging Face tokenizer,
    and a text tower with neither is refused (its ids could not be reproduced).
    """
    from medfm.model_zoo.multimodal import MultiModalConfig

    out = Path(directory)
    if out.exists() and not overwrite:
        raise ReleaseError(f"{out}: already exists (pass overwrite=True to replace it)")
    cfg = config if config is not None else getattr(model, "config", None)
    if cfg is None:
        raise ReleaseError("save_release: no config given and the model has no .config")
    cfg_dict = json.loads(json.dumps(to_dict(cfg)))  # deep copy: the text path below is rewritten
    from_dict(MultiModalConfig, cfg_dict)  # must rebuild; fail before writing anything
    tok_spec = _release_tokenizer(model, tokenizer)
    tensors, aliases = _split_state(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = _shards(tensors, max_shard_bytes)
        records: dict[str, dict] = {}
        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(names, shards):
            save_file(shard, str(tmp / fname), metadata={"format": "pt", "producer": FORMAT})
            for name, t in shard.items():
                records[name] = {"file": fname, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                                 "sha256": sha256_tensor(t)}
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": {n: r["file"] for n, r in records.items()}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        text_dir = None
        if "text" in getattr(model, "towers", {}):
            text_dir = "text"
            tower = model.towers["text"]
            tower.model.save_pretrained(tmp / text_dir, safe_serialization=True)
            if tok_spec["kind"] == "hf":  # the files themselves, byte for byte (their hashes are in the spec)
                src = spec_directory(tok_spec)
                for name in tok_spec["files"]:
                    shutil.copyfile(src / name, tmp / text_dir / name)
                tok_spec = {**tok_spec, "dir": text_dir}
            text_spec = cfg_dict["towers"]["text"]
            text_spec["overrides"] = {**text_spec.get("overrides", {}), "path": text_dir, "load_weights": False,
                                      "tokenizer": text_dir if tok_spec["kind"] == "hf" else None}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg_dict,
            "preprocessing": preprocessing or {},
            "provenance": extra or {},
            "text_tower": text_dir,
            "tokenizer": tok_spec,
            "weights": {"files": names, "tensors": records, "tied": aliases},
            "torch_version": torch.__version__,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=False))
        (tmp / "README.md").write_text(render_card(card))
        _write_checksums(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _release_tokenizer(model, spec: dict | None) -> dict | None:
    """The checked tokenizer spec a release stores for its text tower (None without one)."""
    if "text" not in getattr(model, "towers", {}):
        return None
    if spec is None:
        tower = model.towers["text"]
        if not (tower.cfg.tokenizer or tower.cfg.path):
            raise ReleaseError("save_release: the text tower has no tokenizer of its own; pass tokenizer= (the spec "
                               "it was trained with, medfm.model_zoo.tokenizers.tokenizer_spec)")
        spec = tokenizer_spec(tower, "tower", tower.cfg.max_length)
    try:
        return check_spec(spec, where="save_release tokenizer")
    except TokenizerError as exc:
        raise ReleaseError(str(exc)) from None


def _loaded_tokenizer(root: Path, meta: dict) -> dict | None:
    """The release's tokenizer spec, checked against its files; refuses a text tower whose tokenizer is unknown."""
    if not meta.get("text_tower"):
        return None
    spec = meta.get("tokenizer")
    text = root / meta["text_tower"]
    if spec is None:  # written before specs were recorded: only a stored HF tokenizer can be trusted
        files = tokenizer_files(text)
        if not files:
            raise ReleaseError(f"{root / 'config.json'}: the text tower's tokenizer cannot be reconstructed (no "
                               f"'tokenizer' spec and no tokenizer files in {text}); re-release the checkpoint with "
                               "this medfm")
        over = meta["model"]["towers"]["text"].get("overrides", {})
        spec = {"kind": "hf", "dir": meta["text_tower"], "files": files,
                "max_tokens": int(over.get("max_length", 128))}
    try:
        spec = check_spec(spec, root, where=f"{root / 'config.json'} tokenizer")
    except TokenizerError as exc:
        raise ReleaseError(str(exc)) from None
    return {**spec, "dir": str(root / spec["dir"])} if spec["kind"] == "hf" else dict(spec)


# -- verification and loading -------------------------------------------------------------------------------------
def _read_meta(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise ReleaseError(f"{root}: not a release (no config.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{path}: invalid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ReleaseError(f"{path}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ReleaseError(f"{path}: format_version {meta['format_version']} is newer than this medfm "
                           f"({FORMAT_VERSION}); upgrade medfm")
    return meta


def _open_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
        return out
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise ReleaseError(f"{path}: unreadable safetensors file ({exc})") from None


def verify_release(path: str | os.PathLike) -> list[str]:
    """Every problem found (empty list = intact): checksum mismatches, missing files, corrupted tensors by name."""
    root = Path(path)
    problems = []
    listing = root / CHECKSUMS
    if not listing.is_file():
        return [f"{listing}: missing"]
    meta = _read_meta(root)
    weight_files = set(meta["weights"]["files"])
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        file = root / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
            continue
        if sha256_file(file) == digest:
            continue
        if rel in weight_files:
            bad = _bad_tensors(root, rel, meta)
            problems += bad or [f"{rel}: checksum mismatch (tensor data intact; header or padding altered)"]
        else:
            problems.append(f"{rel}: checksum mismatch")
    return problems


def _bad_tensors(root: Path, rel: str, meta: dict) -> list[str]:
    try:
        tensors = _open_tensors(root / rel, "cpu")
    except ReleaseError as exc:
        return [str(exc)]
    bad = []
    for name, rec in meta["weights"]["tensors"].items():
        if rec["file"] != rel:
            continue
        if name not in tensors:
            bad.append(f"tensor '{name}' missing from {rel}")
        elif sha256_tensor(tensors[name]) != rec["sha256"]:
            bad.append(f"tensor '{name}' in {rel} is corrupted (sha256 mismatch)")
    return bad


def _rebuild(root: Path, meta: dict, spec: dict | None):
    from medfm.model_zoo.multimodal import MultiModalConfig, MultiModalModel

    cfg_dict = json.loads(json.dumps(meta["model"]))
    if meta.get("text_tower"):
        over = cfg_dict["towers"]["text"]["overrides"]
        over["path"] = str(root / meta["text_tower"])
        over["tokenizer"] = spec["dir"] if spec and spec["kind"] == "hf" else None
        over["load_weights"] = False
    try:
        cfg = from_dict(MultiModalConfig, cfg_dict, "model")
    except ConfigError as exc:
        raise ReleaseError(f"{root / 'config.json'}: {exc}") from None
    return MultiModalModel(cfg)


def _text_tensors(root: Path, meta: dict, device: str) -> dict[str, torch.Tensor]:
    text = root / meta["text_tower"]
    index = text / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_FILE]
    out = {}
    for f in files:
        for name, t in _open_tensors(text / f, device).items():
            out[TEXT_PREFIX + name] = t
    return out


def load_release(path: str | os.PathLike, map_location: str = "cpu", verify: bool = True):
    """Rebuild the MultiModalModel of a release directory and load its weights (safetensors only, never pickle).

    Raises ReleaseError naming the file / tensor on corruption, a missing or unexpected tensor, or a shape or
    dtype mismatch against the architecture in config.json.
    """
    root = Path(path)
    meta = _read_meta(root)
    if verify:
        problems = verify_release(root)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ReleaseError(f"{root}: {problems[0]}{more}")
    spec = _loaded_tokenizer(root, meta)
    model = _rebuild(root, meta, spec)
    model.text_tokenizer_spec = spec  # what evals tokenise with (medfm.model_zoo.tokenizers.build_tokenizer)
    weights = meta["weights"]
    state: dict[str, torch.Tensor] = {}
    for f in weights["files"]:
        state.update(_open_tensors(root / f, map_location))
    if meta.get("text_tower"):
        state.update(_text_tensors(root, meta, map_location))
    for alias, source in weights.get("tied", {}).items():
        if source in state:
            state[alias] = state[source]
    expected = model.state_dict()
    for name, t in state.items():
        if name not in expected:
            raise ReleaseError(f"{root}: tensor '{name}' is not part of the architecture in config.json")
        ref = expected[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ReleaseError(f"{root}: tensor '{name}' has shape {list(t.shape)}, the architecture expects "
                               f"{list(ref.shape)}")
        if t.dtype != ref.dtype and not (t.dtype.is_floating_point and ref.dtype.is_floating_point):
            raise ReleaseError(f"{root}: tensor '{name}' has dtype {t.dtype}, expected {ref.dtype}")
    missing = [n for n in expected if n not in state]
    if missing:
        raise ReleaseError(f"{root}: tensor '{missing[0]}' is missing from the release"
                           + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=True)
    model.release_info = {"path": str(root), "preprocessing": meta.get("preprocessing", {}),
                          "provenance": meta.get("provenance", {})}
    return model.to(map_location)


def load(path_or_name: str | os.PathLike, zoo: str | os.PathLike | None = None, map_location: str = "cpu",
         verify: bool = True):
    """Load a release from a directory, or from the zoo by ``name[:version]`` (latest version when omitted)."""
    path = Path(path_or_name)
    if path.is_dir():
        return load_release(path, map_location, verify)
    from medfm.model_zoo.zoo import Zoo

    return load_release(Zoo(zoo).resolve(str(path_or_name)), map_location, verify)


def read_release_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a release (for tools that need the preprocessing spec without building the model)."""
    return _read_meta(Path(path))
