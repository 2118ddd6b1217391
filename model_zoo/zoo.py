"""A local model zoo: a directory of releases plus ``index.json`` that resolves ``name[:version]``.

```
<zoo>/index.json                {"format": 1, "models": {name: {version: {"path", "added", "config_sha256",
                                 "summary"}}}}
<zoo>/<name>/<version>/         a release directory (see release.py)
```
The zoo directory is ``$MEDFM_ZOO`` or ``~/.cache/medfm/zoo`` unless given. Index updates hold an exclusive lock
and replace the file atomically, so concurrent publishers never corrupt it. A name:version is immutable unless
``force=True``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from medfm.model_zoo.release import ReleaseError, read_release_config, save_release, sha256_file, verify_release
from medfm.schema.atomic import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_zoo_dir() -> Path:
    return Path(os.environ.get("MEDFM_ZOO") or Path.home() / ".cache" / "medfm" / "zoo").expanduser()


def _version_key(v: str):
    try:
        from packaging.version import Version

        return (0, Version(v), "")
    except Exception:  # not PEP 440: compare numerically where possible, then as text
        return (1, tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-_]", v)), v)


def parse_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    if not _NAME.match(name) or (version and not _NAME.match(version)):
        raise ReleaseError(f"zoo reference '{ref}': expected NAME[:VERSION] of letters, digits, '.', '_', '-'")
    return name, version or None


class Zoo:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_zoo_dir()
        self.index_path = self.root / "index.json"

    # -- index ---------------------------------------------------------------------------------------------------
    def read_index(self) -> dict:
        if not self.index_path.is_file():
            return {"format": 1, "models": {}}
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as exc:
            raise ReleaseError(f"{self.index_path}: invalid JSON ({exc})") from None
        if not isinstance(index.get("models"), dict):
            raise ReleaseError(f"{self.index_path}: 'models' must be a mapping")
        return index

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_index(self, index: dict) -> None:
        atomic_write(self.index_path, json.dumps(index, indent=2, sort_keys=True))

    # -- queries -------------------------------------------------------------------------------------------------
    def list(self) -> list[dict]:
        """One row per name:version, sorted by name then version."""
        rows = []
        for name, versions in sorted(self.read_index()["models"].items()):
            for version in sorted(versions, key=_version_key):
                rows.append({"name": name, "version": version, **versions[version]})
        return rows

    def resolve(self, ref: str) -> Path:
        """``name`` (latest version) or ``name:version`` -> release directory."""
        name, version = parse_ref(ref)
        models = self.read_index()["models"]
        if name not in models or not models[name]:
            known = ", ".join(sorted(models)) or "none"
            raise ReleaseError(f"zoo {self.root}: no model '{name}' (known: {known})")
        if version is None:
            version = max(models[name], key=_version_key)
        elif version not in models[name]:
            raise ReleaseError(f"zoo {self.root}: '{name}' has no version '{version}' "
                               f"(has {', '.join(sorted(models[name], key=_version_key))})")
        path = self.root / models[name][version]["path"]
        if not path.is_dir():
            raise ReleaseError(f"zoo {self.root}: index lists {name}:{version} at {path}, which does not exist")
        return path

    def show(self, ref: str) -> dict:
        """Index entry + release config + card text of ``name[:version]``."""
        path = self.resolve(ref)
        name, _ = parse_ref(ref)
        version = path.name
        entry = self.read_index()["models"][name][version]
        card = (path / "README.md").read_text() if (path / "README.md").is_file() else ""
        return {"name": name, "version": version, **entry, "dir": str(path), "config": read_release_config(path),
                "card": card}

    # -- publishing ----------------------------------------------------------------------------------------------
    def _register(self, index: dict, name: str, version: str, path: Path, summary: str) -> None:
        index["models"].setdefault(name, {})[version] = {
            "path": path.relative_to(self.root).as_posix(),
            "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config_sha256": sha256_file(path / "config.json"),
            "summary": summary,
        }
        self._write_index(index)

    def _check_free(self, index: dict, name: str, version: str, force: bool) -> None:
        if version in index["models"].get(name, {}) and not force:
            raise ReleaseError(f"zoo {self.root}: {name}:{version} already exists (versions are immutable; "
                               "pass force=True / --force to replace it)")

    def add(self, release_dir: str | os.PathLike, ref: str, force: bool = False, summary: str = "") -> Path:
        """Copy an existing, verified release directory into the zoo as ``name:version``."""
        name, version = parse_ref(ref)
        if version is None:
            raise ReleaseError(f"zoo reference '{ref}': a version is required to add (NAME:VERSION)")
        src = Path(release_dir)
        problems = verify_release(src)
        if problems:
            raise ReleaseError(f"{src}: {problems[0]}")
        with self._locked():
            index = self.read_index()
            self._check_free(index, name, version, force)
            dest = self.root / name / version
            tmp = dest.with_name(f".{version}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
            self._register(index, name, version, dest, summary)
        return dest

    def publish(self, model, ref: str, config=None, card=None, preprocessing=None, force: bool = False,
                summary: str = "", **save_kwargs) -> Path:
        """save_release straight into the zoo and list it as ``name:version``."""
        name, version = parse_ref(ref)
        if version is None:
            raise ReleaseError(f"zoo reference '{ref}': a version is required to publish (NAME:VERSION)")
        with self._locked():
            index = self.read_index()
            self._check_free(index, name, version, force)
            dest = save_release(self.root / name / version, model, config, card, preprocessing, overwrite=force,
                                **save_kwargs)
            self._register(index, name, version, dest, summary)
        return dest
