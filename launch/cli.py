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
         "medfm.model_zoo.cli", "medfm.demo.cli", "medfm.configs.cli")


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


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, except that dotted ``key=value`` overrides may also follow the flags
    (``medfm launch cfg.yaml --nproc-per-node 2 train.steps=20``): argparse stops filling a positional list once
    an option has appeared, so the leftovers are collected here when they all look like overrides."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        rc = args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # write errors and refused checkpoints: one line, exit 1 (launch/errors.py)
        from medfm.launch.errors import one_line

        msg = one_line(exc)
        if msg is None:
            raise
        print(f"medfm: error: {msg}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
