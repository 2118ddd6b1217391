"""Held-out loss of a finished run: the run's own objectives on another split, for scaling-law points.

``python -m medfm.launch.evaluate RUN_DIR [--split val] [--max-batches N] [--seed S]`` prints one JSON line
``{"losses": {objective: mean}, "total": weighted mean, "batches": n, "samples": m}``; each objective's mean is over
the samples that carry its modalities, and every source has weight 1 (the held-out set does not depend on the mixture
a run trained on).

It runs in its own process (a world of one) so the sweep driver never initialises torch.distributed: the final
checkpoint is consolidated to fp32, loaded into the same PretrainModule the run trained (DDP strategy, no DeepSpeed
needed), and evaluated in eval mode under a fixed seed (MAE masks are random) over one pass of the split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _weight(batch: dict, objective: str) -> float:
    """Samples of this batch an objective's loss averages over: those carrying all its modalities (``mae:image`` ->
    image, ``contrastive:image-text`` -> both). Batch losses are averaged with these weights, so a mixed batch counts
    by the samples it really has, not as a whole batch."""
    import torch

    mods = objective.partition(":")[2].split("-")
    flags = [batch[f"{m}_present"] for m in mods if f"{m}_present" in batch]
    if not flags:
        return float(len(batch.get("keys", ())) or 1)
    both = flags[0].bool()
    for f in flags[1:]:
        both = both & f.bool()
    return float(torch.as_tensor(both).sum())


def evaluate_run(run_dir, split: str = "val", max_batches: int = 0, seed: int = 0) -> dict:
    import torch

    from medfm.model_zoo.checkpoint_io import consolidate
    from medfm.pretrain.config import RunConfig
    from medfm.pretrain.engine import Engine, init_distributed, setup_environment
    from medfm.pretrain.train import build_data
    from medfm.schema import ConfigError, from_dict

    run_dir = Path(run_dir)
    cfg = from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.train.strategy = "ddp"
    cfg.data.split = split
    cfg.data.mode = "epoch"
    cfg.data.shuffle = False
    cfg.data.num_workers = 0
    for src in cfg.data.sources:  # the same held-out set whatever mixture the run trained on (sweep mixture axes)
        src.weight = 1.0
    setup_environment()
    init_distributed()
    engine = Engine(cfg, 0, 1)
    try:
        state = consolidate(run_dir / "checkpoints")
    except ValueError as exc:  # none complete, or a file that would need unpickling (refused)
        raise ConfigError(str(exc)) from None
    missing, unexpected = engine.module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{run_dir}: checkpoint does not match the run's model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    engine.module.eval()
    loader = build_data(cfg, engine, 0, 1)
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    batches = samples = 0
    with torch.no_grad():
        for batch in loader:
            losses, _, _ = engine.forward(batch, batch.get("plan"))
            for name, value in losses.items():
                n = _weight(batch, name)
                if n:  # a batch none of whose samples carry the objective's modalities says nothing about it
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                    counts[name] = counts.get(name, 0.0) + n
            batches += 1
            samples += len(batch.get("keys", ()))
            if max_batches and batches >= max_batches:
                break
    if not batches:
        raise ConfigError(f"{run_dir}: no '{split}' samples in {[s.path for s in cfg.data.sources]}")
    means = {k: v / counts[k] for k, v in sums.items()}
    weights = {o.name: o.weight for o in cfg.objectives}
    total = sum(weights.get(k, 0.0) * v for k, v in means.items())
    return {"losses": means, "total": total, "batches": batches, "samples": samples, "split": split}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medfm.launch.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--split", default="val")
    p.add_argument("--max-batches", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from medfm.schema import ConfigError

    try:
        result = evaluate_run(args.run_dir, args.split, args.max_batches, args.seed)
    except ConfigError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
