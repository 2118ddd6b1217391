"""medfm.schema.atomic: one helper for every atomic file write (tmp beside the file, fsync, rename)."""

import json
import os
import re
from pathlib import Path

import pytest

from medfm.schema.atomic import atomic_open, atomic_path, atomic_write, commit_file

REPO = Path(__file__).resolve().parents[1]


def test_atomic_write_text_and_bytes(tmp_path):
    p = tmp_path / "a.json"
    assert atomic_write(p, '{"x": 1}') == p
    assert json.loads(p.read_text()) == {"x": 1}
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary left behind


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    """A writer that fails half way (a crash, ENOSPC) must leave the previous content under the name: an in-place
    ``open(path, 'w')`` would already have truncated it when the error comes."""
    p = tmp_path / "index.json"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(p) as f:
        f.write("new, half")
        f.flush()
        assert p.read_text() == "old"  # nothing visible under the name while writing
        raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["index.json"]  # the temporary is removed


def test_atomic_path_for_writers_by_name(tmp_path):
    p = tmp_path / "cache.safetensors"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent and tmp.name.startswith(".cache.safetensors.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"data")
        assert not p.exists()
    assert p.read_bytes() == b"data"
    with pytest.raises(OSError), atomic_path(p) as tmp:
        tmp.write_bytes(b"torn")
        raise OSError(28, "No space left on device")
    assert p.read_bytes() == b"data" and sorted(os.listdir(tmp_path)) == ["cache.safetensors"]


def test_commit_file_moves_a_streamed_temporary(tmp_path):
    tmp = tmp_path / "shard-000000.tar.tmp"
    tmp.write_bytes(b"tar")
    assert commit_file(tmp, tmp_path / "shard-000000.tar").read_bytes() == b"tar"
    assert not tmp.exists()


def test_read_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="write mode"), atomic_open(tmp_path / "x", "r"):
        pass


def test_shards_json_writer_leaves_no_torn_temporary(tmp_path):
    """shards' manifest writer streams json.dump: an unserialisable value fails mid-write. The old file stays and
    no ``manifest.json.tmp`` is left beside it (the old writer left it behind)."""
    from medfm.shards.writer import write_json_atomic

    p = tmp_path / "manifest.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": 2, "b": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


# Renames that are not file writes: whole directories swapped into place (a release, a zoo entry, a universal
# checkpoint) and a manifest renamed aside after a failed build.
DIRECTORY_SWAPS = {"pretrain/reshard.py", "shards/cli.py"}


def test_every_file_write_goes_through_the_helper():
    """One owner: ``os.replace`` appears in medfm.schema.atomic only (and in the directory swaps above)."""
    offenders = []
    for part in ("shards", "model_zoo", "pretrain", "launch", "evals", "schema", "demo"):
        for f in sorted((REPO / part).rglob("*.py")):
            rel = f.relative_to(REPO).as_posix()
            if rel == "schema/atomic.py" or rel in DIRECTORY_SWAPS:
                continue
            if re.search(r"\bos\.(replace|rename)\(", f.read_text()):
                offenders.append(rel)
    assert offenders == []
