"""The ``medfm`` command. Each part registers its own subcommands through ``add_cli(subparsers)`` in its
``cli.py``; this file only assembles them and maps errors to exit codes (DESIGN.md):
0 success, 1 the work found a problem, 2 bad usage or invalid config (one line, no traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

from medfm.schema import ConfigError

# Parts that contribute subcommands, in help order. A part whose cli module does not exist yet is skipped,
# so a subcommand appears exactly when it works.
PARTS = ("medfm.shards.cli", "medfm.pretrain.cli", "medfm.launch.commands", "medfm.evals.cli", "medfm.launch.release",
         "medfm.model_zoo.cli", "medfm.launch.demo")


class UsageError(Exception):
    """Bad usage detected after argument parsing (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"medfm: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medfm", description="Pretrain multimodal medical foundation models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfm: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
