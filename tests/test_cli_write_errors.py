"""Write errors and refused checkpoints are one line and exit 1 in every command (issue #17): a disk-full or
read-only output during ``medfm shards build`` leaves no partial shard set; a poisoned checkpoint given to
``medfm release`` / ``medfm eval`` is refused without a traceback. (Tests run as root here, so a chmod'ed
directory would still be writable: the write error is injected at the writer.)"""

from __future__ import annotations

import errno
import pathlib

import numpy as np
import pytest
import torch

from medfm.launch.cli import main


class _Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path("/tmp/medfm-should-never-exist"),))


def _png_corpus(d: pathlib.Path) -> pathlib.Path:
    from PIL import Image

    d.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f"x{i}.png")
    return d


def test_shards_build_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from medfm.shards import writer

    src = _png_corpus(tmp_path / "in")
    out = tmp_path / "out"
    real = writer.DatasetWriter._add_member
    calls = {"n": 0}

    def full(self, name, data):
        calls["n"] += 1
        if calls["n"] > 3:  # after a few members: a shard file is open, maybe one finished
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "shard-000001.tar.tmp"))
        return real(self, name, data)

    monkeypatch.setattr(writer.DatasetWriter, "_add_member", full)
    rc = main(["shards", "build", str(src), "--out", str(out), "--allow-unsalted", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0], err
    assert not out.exists()  # no partial output


@pytest.mark.parametrize("command", ["release", "eval"])
def test_a_poisoned_checkpoint_is_refused_in_one_line(tmp_path, capsys, command):
    import json

    tag = tmp_path / "ckpt" / "step1"
    (tag / "client").mkdir(parents=True)
    for kind in ("optim", "model"):
        torch.save({"payload": _Payload()}, tag / f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt")
    (tag / "client" / "rank0.json").write_text(json.dumps({"step": 1, "config": {"model": {"towers": {}}}}))
    (tag / "COMPLETE").write_text("{}")
    (tmp_path / "ckpt" / "latest").write_text("step1")
    if command == "release":
        argv = ["release", str(tmp_path / "ckpt"), "--name", "x", "--version", "1", "--zoo", str(tmp_path / "zoo")]
    else:
        suite = tmp_path / "suite.yaml"
        suite.write_text("name: s\ntasks: []\n")
        argv = ["eval", str(tmp_path / "ckpt"), "--suite", str(suite), "--out", str(tmp_path / "ev")]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2) and len(err) == 1 and "Traceback" not in err[0], err
    assert not pathlib.Path("/tmp/medfm-should-never-exist").exists()


def test_pretrain_run_dir_that_cannot_be_written_is_one_line(tmp_path, capsys):
    import sys

    import yaml

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from pretrain_support import make_shards, run_config

    shards = make_shards(tmp_path / "shards", n=4, modalities=("image",), per_shard=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = run_config(blocker / "run", shards, [{"name": "mae:image"}], ("image",), steps=1, train={"strategy": "ddp"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["pretrain", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"cannot write {blocker / 'run'}" in err[0], err
