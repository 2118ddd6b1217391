"""What a resume may change. The config a run resumes with is compared to the one its checkpoint recorded:

* may change (applied, logged as changed): the learning rate and its schedule, the step count, and the log /
  eval / checkpoint cadence. The optimizer's restored lr is recomputed from the new schedule at the restored
  step, so ``optim.lr=...`` on resume is what trains (it used to be silently replaced by the checkpoint's lr
  while config.yaml said otherwise).
* may not change (refused before anything is written, one line naming the key, exit 2): the model, the
  objectives, the global batch, the seeds and the data (sources, split, plan, mixing) — resuming with any of them
  changed is a different run, and the checkpoint's optimizer state and loader cursors would not mean what they
  meant.
* anything else (tracking, progress bar, DataLoader workers, nan guard, checkpoint.keep, ...) is free.
"""

from __future__ import annotations

import sys

from medfm.pretrain.tracking import flatten
from medfm.schema import ConfigError, to_dict

MAY_CHANGE = ("optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "train.steps", "train.log_every",
              "eval.every", "checkpoint.every")
MUST_MATCH = ("model", "objectives", "train.seed", "data.seed", "data.sources", "data.split", "data.plan",
              "data.mode", "data.shuffle", "data.shuffle_window_shards", "data.drop_last", "data.steps_per_epoch")


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def saved_config(ckpt, spec: str, rank: int) -> tuple[dict, int]:
    """(config, world size) that checkpoint ``spec`` recorded (its client state), read before any engine is
    built."""
    try:
        tag = ckpt.resolve(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from medfm.model_zoo import checkpoint_io as layout  # the one owner of the checkpoint layout

    mine = rank if layout.client_file(ckpt.root, tag, rank).is_file() else 0
    try:
        client = layout.read_client(ckpt.root, tag, mine)
        return client.get("config") or {}, int(client.get("world_size") or 0)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint.resume={spec}: {exc}") from None


def resume_changes(cfg, saved: dict, saved_world: int, world: int) -> dict[str, tuple[str, str]]:
    """``{key: (was, now)}`` of the allowed changes; ConfigError naming the first key that may not change."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and any(_matches(key, p) for p in MUST_MATCH):
            raise ConfigError(f"checkpoint.resume: {key} was {old.get(key)} in the checkpoint, now {new.get(key)}: "
                              "it may not change on resume (start a new run)")
    t = saved.get("train", {})
    was = int(saved.get("data", {}).get("batch_size", 0)) * int(t.get("grad_accum", 1)) * saved_world
    now = cfg.global_batch(world)  # the saved side is a plain dict (the checkpoint's), computed the same way
    if was and was != now:
        raise ConfigError(f"checkpoint.resume: the global batch (data.batch_size x train.grad_accum x world size) "
                          f"was {was}, now {now}: it may not change on resume")
    return {k: (old.get(k), new.get(k)) for k in MAY_CHANGE if old.get(k) != new.get(k)}


def apply_changes(engine, changed: dict, rank: int) -> None:
    """Make the restored optimizer train at the new schedule's lr for the restored step, and say what changed."""
    if not changed:
        return
    sched = engine.scheduler
    base = float(engine.cfg.optim.lr)
    sched.base_lrs = [base for _ in sched.base_lrs]
    # LambdaLR.get_lr's own expression: an unchanged schedule gives the restored lr bit for bit.
    lrs = [b * lam(sched.last_epoch) for lam, b in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    if rank == 0:
        text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        print(f"medfm pretrain: resume: changed {text}", file=sys.stderr)
