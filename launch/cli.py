"""The ``medfm`` command. This file assembles every part's verbs into one parser, grouped by part in ``--help``,
and maps errors to exit codes (DESIGN.md): 0 success, 1 the work found a problem, 2 bad usage or invalid config
(one line, no traceback).

Each part's ``cli`` module adds its own verbs (``add_cli(subparsers)``) and exposes argument functions for the verbs
that live in another part's group; where those go is decided here only: ``medfm pretrain consolidate`` (pretrain's)
and ``medfm zoo release`` (launch's: it consolidates a training checkpoint, which model_zoo may not import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Parts and the module that adds their verbs, in help order. Every one exists: an import error is a real error.
PARTS = (("shards", "medfm.shards.cli"), ("pretrain", "medfm.pretrain.cli"), ("launch", "medfm.launch.commands"),
         ("evals", "medfm.evals.cli"), ("model_zoo", "medfm.model_zoo.cli"), ("demo", "medfm.demo.cli"),
         ("configs", "medfm.configs.cli"))

# `medfm pretrain CONFIG.yaml` takes a config path where a verb would go, so argparse cannot nest `consolidate`
# under it: the two words are routed to one parser registered under this name (a config file named `consolidate`
# is passed as ./consolidate).
PRETRAIN_CONSOLIDATE = "pretrain consolidate"
# Old spellings, kept for one release; using one prints a one-line note on stderr. (`medfm release` is not here:
# it is in DESIGN.md's command contract and stays, silently, beside `medfm zoo release`.)
DEPRECATED = {"pretrain-consolidate": PRETRAIN_CONSOLIDATE}


class UsageError(Exception):
    """Bad usage detected after argument parsing (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"medfm: error: {message}\n")


class _PartVerbs:
    """The top-level subparsers as one part sees them: records the verbs it adds (name, help) for the grouped
    ``medfm --help``."""

    def __init__(self, sub):
        self._sub = sub
        self.verbs: list[tuple[str, argparse.ArgumentParser, str]] = []

    def add_parser(self, name, **kwargs):
        parser = self._sub.add_parser(name, **kwargs)
        self.verbs.append((name, parser, kwargs.get("help") or ""))
        return parser


def _actions(parser: argparse.ArgumentParser) -> list[str]:
    """The sub-verbs of ``parser`` (``build|merge|...`` of ``shards``), none when it takes no verb."""
    for action in parser._actions:  # argparse has no public accessor for a parser's subcommands
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _grouped_help(groups: list[tuple[str, list]]) -> str:
    rows = []
    for part, verbs in groups:
        rows.append(f"  {part}")
        for name, parser, help_ in verbs:
            subs = _actions(parser)
            rows.append((f"    {name} {'|'.join(subs)}" if subs else f"    {name}", help_))
    width = max(len(r[0]) for r in rows if isinstance(r, tuple)) + 2
    lines = ["commands, by part (`medfm COMMAND --help` for each):"]
    lines += [r if isinstance(r, str) else f"{r[0]:<{width}}{r[1]}" for r in rows]
    lines += ["", "old spellings: " + ", ".join(f"medfm {old} (= medfm {new}; kept for one release)"
                                            for old, new in DEPRECATED.items()),
              "               medfm release (= medfm zoo release; stays: DESIGN.md's contract)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from medfm.launch.commands import RELEASE_HELP, add_release
    from medfm.pretrain.cli import CONSOLIDATE_HELP, add_consolidate

    parser = _Parser(prog="medfm", description="Pretrain multimodal medical foundation models.",
                     usage="medfm [-h] COMMAND ...", formatter_class=argparse.RawDescriptionHelpFormatter)
    # The flat list argparse would print is replaced by the grouped one (epilog) below.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, help=argparse.SUPPRESS,
                                prog="medfm")
    sub.required = True
    groups = []
    for part, name in PARTS:
        verbs = _PartVerbs(sub)
        returned = importlib.import_module(name).add_cli(verbs)
        if part == "pretrain":
            add_consolidate(verbs.add_parser(PRETRAIN_CONSOLIDATE, help=CONSOLIDATE_HELP,
                                             aliases=list(DEPRECATED)))
        if part == "model_zoo":  # add_cli returned the `zoo` verbs: launch's release joins them
            add_release(returned.add_parser("release", help=RELEASE_HELP))
            add_release(sub.add_parser("release"))  # DESIGN.md's spelling; listed under zoo in the help
        groups.append((part, verbs.verbs))
    parser.epilog = _grouped_help(groups)
    return parser


def _route(argv) -> list[str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["pretrain", "consolidate"]:
        argv = [PRETRAIN_CONSOLIDATE, *argv[2:]]
    return argv


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, except that dotted ``key=value`` overrides may also follow the flags
    (``medfm launch cfg.yaml --nproc-per-node 2 train.steps=20``): argparse stops filling a positional list once
    an option has appeared, so the leftovers are collected here when they all look like overrides."""
    args, extra = parser.parse_known_args(_route(argv))
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if args.command in DEPRECATED:
        print(f"medfm: '{args.command}' is deprecated; use 'medfm {DEPRECATED[args.command]}'", file=sys.stderr)
    from medfm.launch.errors import exit_code  # the one mapping of errors to exit codes (workers use it too)

    try:
        return exit_code(args.func, args)
    except UsageError as exc:  # the CLI's own bad usage: like a ConfigError, one line and 2
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
