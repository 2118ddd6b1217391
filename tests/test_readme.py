"""The README's cheap command blocks run as written on a fresh copy of the repository once the demo corpus exists
(what `make demo` builds first; built here by the same code, ``build_demo_corpus``, without the demo's training).

A block runs when the line above its fence is ``<!-- readme-test ... -->``; it may hold only ``medfm`` commands
(``\\`` continuations and ``# comments`` allowed), each of which must exit 0. The unmarked blocks need a cluster,
the user's own data, or a finished demo run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from conftest import DEMO_REAL, require_real

sys.path.insert(0, str(Path(__file__).parent))
from checkout_copy import REPO, fresh_copy  # noqa: E402

from medfm.launch.cli import main  # noqa: E402

MARK = "<!-- readme-test"


def readme_commands(text: str) -> list[str]:
    """Every command of the marked ``bash`` blocks, continuation lines joined, comments dropped."""
    lines, commands = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith(MARK):
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```bash"):
            raise ValueError(f"README line {i + 1}: a readme-test mark must sit right above a ```bash fence")
        pending = ""
        for body in lines[i + 2:]:
            if body.startswith("```"):
                break
            pending += body.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            argv = shlex.split(pending, comments=True)
            pending = ""
            if argv and argv[0] != "medfm":
                raise ValueError(f"README line {i + 1}: a readme-test block holds only medfm commands, got {argv[0]!r}")
            if argv:
                commands.append(shlex.join(argv))
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text())


def test_the_marker_finds_the_cheap_blocks():
    text = "x\n<!-- readme-test -->\n```bash\nmedfm a \\\n   --b c   # note\n\nmedfm d\n```\n```bash\nmedfm e\n```\n"
    assert readme_commands(text) == ["medfm a --b c", "medfm d"]
    with pytest.raises(ValueError, match="only medfm commands"):
        readme_commands("<!-- readme-test -->\n```bash\nrm -rf runs\n```\n")
    assert {"medfm --help", "medfm recipes list", "medfm launch configs/tiny_cpu.yaml --nproc-per-node 2 --dry-run",
            "medfm launch tiny_cpu --nproc-per-node 2 --dry-run"} <= set(COMMANDS)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh copy of the repository with runs/demo/corpus built as `make demo` builds it."""
    from medfm.demo.corpus import build_demo_corpus

    require_real(DEMO_REAL)  # fails, never skips, without the demo extra
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    assert not (root / "runs").exists()
    build_demo_corpus(root / "runs" / "demo" / "corpus", salt="test-readme-salt", workers=2, progress=False,
                      log=lambda msg: None)
    return root


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(clone, command, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    try:
        rc = main(shlex.split(command)[1:])
    except SystemExit as exc:  # argparse's --help
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 0, f"{command}\n{out[-2000:]}\n{err[-3000:]}"
