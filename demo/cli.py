"""``medfm demo``: the verb ``medfm.launch.cli`` registers. Only argparse here; the demo itself (medfm.demo.stages)
is imported when the verb runs, so building the ``medfm`` parser loads nothing of it."""

from __future__ import annotations

import sys

from medfm.schema import ConfigError


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end demo: real files -> shards -> ZeRO-3 pretrain -> "
                                    "eval -> zoo release")
    p.add_argument("--out", default="runs/demo", help="demo working directory")
    p.add_argument("--zoo", default="zoo", help="zoo directory the demo model is released into")
    p.add_argument("--steps", type=int, default=150, help="pretraining steps")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo outputs and start over")

    def _main(a):
        if a.steps < 1 or a.nproc < 1:
            raise ConfigError("--steps and --nproc must be >= 1")
        from medfm.demo.stages import run_demo

        try:
            run_demo(a.out, a.zoo, a.steps, a.nproc, a.workers, a.fresh)
        except RuntimeError as exc:  # a stage failed: say which in one line (its own output is above), exit 1
            print(f"medfm demo: {exc}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(func=_main)
