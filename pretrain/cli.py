"""``medfm pretrain CONFIG.yaml [key=value ...]``: one process of a torchrun world (or a world of one alone).

``medfm pretrain consolidate RUN_DIR|CHECKPOINT_DIR [--tag TAG] --out model.safetensors`` merges ZeRO-3 partitions
into one fp32 safetensors file (what model_zoo's release takes); ``medfm pretrain-consolidate`` is its old spelling.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medfm.schema import ConfigError
from medfm.schema.atomic import atomic_path


def _pretrain(args) -> int:
    from medfm.pretrain.config import load_run_config

    rc = train_and_report(load_run_config(args.config, args.overrides))
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a worker of the user's own torchrun: no teardown after the run
        from medfm.pretrain import collectives

        collectives.leave(rc)
    return rc


def train_and_report(cfg) -> int:
    """Train the parsed RunConfig ``cfg`` on this rank; the exit code, with one line on stderr when it did not
    finish. What ``medfm pretrain`` runs after its parse, and what a ``medfm launch`` worker calls with the
    config.yaml the launcher wrote (no second parse, no CLI re-entry)."""
    from medfm.pretrain.train import run
    from medfm.shards.preflight import ShardCheckError

    try:
        result = run(cfg)
    except ShardCheckError as exc:  # the data check found a bad shard: the work's finding, exit 1, one line
        print(f"medfm pretrain: {exc}", file=sys.stderr)
        return 1
    if result.status == "preempted":  # checkpoint written, nothing lost: not a failure (see pretrain/preemption.py)
        print(f"medfm pretrain: {result.message}", file=sys.stderr)
        return 0
    if result.status != "finished":
        print(f"medfm pretrain: {result.message}", file=sys.stderr)
        return 1
    return 0


def _consolidate(args) -> int:
    from safetensors.torch import save_file

    from medfm.pretrain.checkpoint import consolidate, model_state_dict

    root = Path(args.path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise ConfigError(f"{args.path}: not a run or checkpoint directory")
    try:
        sd = consolidate(root, args.tag)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not args.full:
        sd = model_state_dict(sd)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:  # a failed or killed write never leaves a torn file under --out
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    print(f"wrote {len(sd)} tensors to {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain with MAE / contrastive / generative objectives",
                              description=__doc__)
    p.add_argument("config", help="run config YAML (see configs/pretrain/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=10")
    p.set_defaults(func=_pretrain)


CONSOLIDATE_HELP = "merge a ZeRO-3 checkpoint into one fp32 safetensors"


def add_consolidate(c) -> None:
    """Arguments of ``medfm pretrain consolidate`` on the parser the CLI assembly (launch/cli.py) made for it."""
    c.add_argument("path", help="run directory or its checkpoints/ directory")
    c.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    c.add_argument("--out", required=True, help="output .safetensors")
    c.add_argument("--full", action="store_true", help="keep objective-owned modules (LM, projectors) too")
    c.set_defaults(func=_consolidate)
