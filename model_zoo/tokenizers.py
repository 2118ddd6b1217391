"""The text tokenizer of a model, decided once and carried with it.

Text becomes ids the same way in pretraining (the loader's tokenizer), in evaluation (zero-shot prompts, retrieval
captions, generation's begin/end ids) and after release; if any of them guesses differently, a text tower sees
ids it never saw (the failure this module exists to prevent: a release without tokenizer files used to be read
with a tokenizer rebuilt from a bare ``config.json``, five ids, every caption the same).

A *spec* is a small JSON-safe dict that rebuilds the tokenizer exactly:

* ``{"kind": "bytes", "vocab_size": 259, "max_tokens": T}`` — medfm.shards.collate.ByteTokenizer (UTF-8 bytes);
* ``{"kind": "hf", "source": <local dir or pkg: spec>, "files": {name: sha256}, "max_tokens": T}`` — a Hugging
  Face tokenizer from local files, pinned by the hash of every tokenizer file (a release stores the files
  themselves and names them with ``"dir"``, relative to the release).

``tokenizer_spec`` is the one decision (pretrain's ``train.tokenizer`` + the loader's ``text_max_tokens``);
``build_tokenizer`` turns a spec back into the loader's callable ``list[str] -> (ids, valid)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from medfm.schema import ConfigError

KINDS = ("tower", "bytes")  # pretrain's train.tokenizer values
# Files a Hugging Face tokenizer may be saved as (config.json / weights of the tower are not part of it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


class TokenizerError(ConfigError):
    """A tokenizer that cannot be decided or rebuilt exactly; one line naming the field or file."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_files(directory: str | Path) -> dict[str, str]:
    """{file name: sha256} of the tokenizer files in ``directory`` (empty when it holds none)."""
    d = Path(directory)
    files = {n: _sha256(d / n) for n in TOKENIZER_FILES if (d / n).is_file()}
    if not ({"tokenizer.json", "tokenizer_config.json"} & set(files)):
        return {}  # a vocab.txt alone is not a tokenizer AutoTokenizer can rebuild faithfully
    return files


def tokenizer_spec(tower, kind: str, max_tokens: int) -> dict:
    """The tokenizer a text ``tower`` is trained / evaluated with: pretrain's ``train.tokenizer`` (``kind``)."""
    from medfm.shards.collate import ByteTokenizer

    if max_tokens < 2:
        raise TokenizerError(f"data.collate.text_max_tokens must be >= 2, got {max_tokens}")
    if kind == "bytes":
        vocab = tower.hf_config.vocab_size
        if vocab < ByteTokenizer.vocab_size:
            raise TokenizerError(f"train.tokenizer=bytes needs model.towers.text vocab_size >= "
                                 f"{ByteTokenizer.vocab_size}, got {vocab}")
        return {"kind": "bytes", "vocab_size": ByteTokenizer.vocab_size, "max_tokens": int(max_tokens)}
    if kind != "tower":
        raise TokenizerError(f"train.tokenizer must be one of {list(KINDS)}, got {kind!r}")
    from medfm.model_zoo.text import resolve_local_dir

    source = tower.cfg.tokenizer or tower.cfg.path
    if source is None:
        raise TokenizerError("train.tokenizer=tower needs model.towers.text tokenizer=<local dir> (the tower has "
                             "none configured); or train.tokenizer=bytes")
    try:
        directory = resolve_local_dir(source)
    except FileNotFoundError as exc:
        raise TokenizerError(f"model.towers.text tokenizer: {exc}") from None
    files = tokenizer_files(directory)
    if not files:
        raise TokenizerError(f"model.towers.text tokenizer: {directory} holds no tokenizer files "
                             f"(expected tokenizer.json or tokenizer_config.json)")
    return {"kind": "hf", "source": str(source), "files": files, "max_tokens": int(max_tokens)}


def spec_from_run_config(tower, config: dict) -> dict:
    """``tokenizer_spec`` from a resolved run config as saved in a checkpoint's client state (a plain dict)."""
    train = config.get("train") or {}
    collate = (config.get("data") or {}).get("collate") or {}
    return tokenizer_spec(tower, train.get("tokenizer", "tower"), int(collate.get("text_max_tokens", 128)))


def spec_directory(spec: dict, base: str | Path | None = None) -> Path:
    """Where an ``hf`` spec's files are: ``base / dir`` for a release, else its (local) source."""
    from medfm.model_zoo.text import resolve_local_dir

    if spec.get("dir") is not None:
        return Path(base or ".") / spec["dir"]
    try:
        return resolve_local_dir(spec["source"])
    except FileNotFoundError as exc:
        raise TokenizerError(f"tokenizer source: {exc}") from None


def check_spec(spec, base: str | Path | None = None, where: str = "tokenizer") -> dict:
    """Raise TokenizerError unless ``spec`` rebuilds exactly (well-formed; hf files present with their hashes)."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("bytes", "hf"):
        raise TokenizerError(f"{where}: expected a tokenizer spec with kind bytes|hf, got {spec!r}")
    if not isinstance(spec.get("max_tokens"), int) or spec["max_tokens"] < 2:
        raise TokenizerError(f"{where}: max_tokens must be an int >= 2, got {spec.get('max_tokens')!r}")
    if spec["kind"] == "bytes":
        from medfm.shards.collate import ByteTokenizer

        if spec.get("vocab_size") != ByteTokenizer.vocab_size:
            raise TokenizerError(f"{where}: byte tokenizer vocab_size {spec.get('vocab_size')!r} is not this "
                                 f"medfm's {ByteTokenizer.vocab_size}")
        return spec
    files = spec.get("files")
    if not isinstance(files, dict) or not files:
        raise TokenizerError(f"{where}: an hf tokenizer spec needs its files with their sha256")
    directory = spec_directory(spec, base)
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise TokenizerError(f"{where}: tokenizer file {path} is missing")
        if _sha256(path) != digest:
            raise TokenizerError(f"{where}: tokenizer file {path} does not match its recorded sha256 (the "
                                 "tokenizer changed since the model was trained)")
    return spec


def build_tokenizer(spec: dict, base: str | Path | None = None):
    """The loader-format callable ``list[str] -> (ids long [B, T], valid bool [B, T])`` of a checked spec."""
    from medfm.shards.collate import ByteTokenizer, HFTokenizer

    check_spec(spec, base)
    if spec["kind"] == "bytes":
        return ByteTokenizer(spec["max_tokens"])
    return HFTokenizer(hf_tokenizer(spec, base), spec["max_tokens"])


def hf_tokenizer(spec: dict, base: str | Path | None = None):
    """The Hugging Face tokenizer object of an ``hf`` spec (for begin/end ids and decoding)."""
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(spec_directory(spec, base)))
