"""The training loop (torchtitan-style: short, explicit, every collective visible).

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch carries the loader's StepPlan, a pure function
of (seed, step) that every rank computes identically, so every rank runs the same towers and objectives in the same
order (ZeRO-3 gathers match; no mixed-modality hang). Per step: losses (mean over ranks = the global loss), lr,
per-group gradient norms, samples/s, tokens/s, MFU; a NaN/Inf guard skips the step (all ranks agree through one
all-reduce) and stops the run after ``nan_guard`` consecutive skips, naming the objective, with the last good
checkpoint kept.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medfm.pretrain import collectives
from medfm.pretrain.checkpoint import CheckpointManager, git_commit, rng_state, set_rng_state
from medfm.pretrain.config import RunConfig, write_run_config
from medfm.pretrain.data_report import announce_lost, lost_metrics, skip_metrics, skipped_all_ranks
from medfm.pretrain.engine import Engine, init_distributed, setup_environment
from medfm.pretrain.faults import FaultInjector
from medfm.pretrain.peak_flops import measure_peak_flops, mfu_metrics, mfu_peak  # noqa: F401 (re-export)
from medfm.pretrain.preemption import Preemption
from medfm.pretrain.reshard import keep_global_batch
from medfm.pretrain.resume_config import apply_changes, resume_changes, saved_config
from medfm.pretrain.step_flops import analytic_covers, analytic_micro_step_flops
from medfm.pretrain.tracking import Tracker, flatten
from medfm.schema import ConfigError, to_dict


@dataclass
class RunResult:
    status: str  # "finished" | "nan_stop" | "preempted" (signal: checkpoint written, see preemption.py)
    step: int  # optimizer steps completed (incl. skipped ones)
    losses: list[dict] = field(default_factory=list)  # per step, rank-mean losses
    skipped: int = 0
    message: str = ""
    run_id: str | None = None
    train_flops: float = 0.0  # cumulative model FLOPs (fwd + bwd, all ranks), carried across resumes


def reduce_step_totals(loss_sums: dict[str, float], tokens: float, flops: float, world: int):
    """(rank-mean losses, tokens, FLOPs) of one step over all ranks: one float64 all-reduce (collectives places it).
    Each rank holds its share of the global mean loss (losses.py contract), so the sum over ranks / world is it."""
    names = sorted(loss_sums)
    vec = collectives.reduce_floats([loss_sums[n] for n in names] + [float(tokens), float(flops)])
    return {n: vec[i] / world for i, n in enumerate(names)}, vec[-2], vec[-1]


def build_data(cfg: RunConfig, engine: Engine, rank: int, world: int):
    """The real medfm.shards loader for this rank, with the text tower's tokenizer when text is trained."""
    from medfm.model_zoo.tokenizers import build_tokenizer, tokenizer_spec
    from medfm.shards.loader import build_loader

    tokenizer = None
    if "text" in engine.module.model.towers:  # the one decision evals and release repeat (a ConfigError if bad)
        tower = engine.module.model.towers["text"]
        tokenizer = build_tokenizer(tokenizer_spec(tower, cfg.train.tokenizer, cfg.data.collate.text_max_tokens))
    return build_loader(cfg.data, rank=rank, world_size=world, tokenizer=tokenizer)


class _Batches:
    """Endless iteration over the loader (a new epoch when one ends) that keeps the loader's state current.

    Starting a DataLoader iterator draws a seed from the global torch RNG; it is drawn inside ``fork_rng`` so the
    training RNG stream (dropout, MAE masks) does not depend on when iterators were (re)created — otherwise a
    resumed run would diverge from the uninterrupted one.
    """

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def _start(self):
        with torch.random.fork_rng(devices=[]):
            self._it = iter(self.loader)
            return next(self._it)

    def __next__(self):
        if self._it is None:
            return self._start()
        try:
            return next(self._it)
        except StopIteration:
            return self._start()


def _flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def _micro_step(engine: Engine, batch: dict, plan, poisoned: bool):
    """Forward + backward of one micro-batch -> (loss names, values, tokens, names of non-finite losses).

    Non-finite losses are detected on every rank with one all-reduce, so all ranks agree on skipping; the
    backward of a skipped step is made NaN (also when an earlier micro-batch of the step was the bad one), which
    DeepSpeed's invalid-gradient-norm check turns into a dropped step."""
    losses, total, tok = engine.forward(batch, plan)
    names = list(losses)
    vals = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    flags = collectives.all_reduce(~torch.isfinite(vals), "max")  # on the loss's device; NCCL sees uint8
    bad = [n for n, b in zip(names, flags.tolist()) if b]
    vals = vals.cpu()
    if bad or poisoned:
        total = total * float("nan")
    engine.backward(total)
    return names, vals, tok, bad


def _call_hook(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eval.hook: cannot import {spec!r} ({exc})") from None


def run(cfg: RunConfig) -> RunResult:
    """Train ``cfg`` as one rank of the current torchrun world (or alone)."""
    setup_environment()
    rank, world = init_distributed()
    try:
        faults = FaultInjector.from_env(rank)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t = cfg.train
    keep_global_batch(cfg, world)  # a ZeRO-3 resume at another world size keeps the global batch sequence
    cfg.resolve_world(world)  # batch arithmetic for this world; a derived grad_accum (0) becomes its number
    run_dir = Path(cfg.run_dir)
    earlier = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep, rank, world).complete_tags()
    if not cfg.checkpoint.resume and earlier:
        # A fresh run would interleave its checkpoints with the old run's, prune by step number across both, and
        # could move "latest" onto a pruned tag: refuse before anything is written.
        raise ConfigError(f"run_dir {run_dir} already holds checkpoints ({', '.join(earlier[-2:])}) of an earlier "
                          "run: pass checkpoint.resume=latest to continue it, or a new name/run_dir")
    changed = {}
    if cfg.checkpoint.resume:  # refuse a change that may not happen on resume before config.yaml is rewritten
        changed = resume_changes(cfg, *saved_config(CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep,
                                                                      rank, world), cfg.checkpoint.resume, rank),
                                 world)
    if rank == 0:  # the config this run trains with (a launch wrote the same text already: then no write)
        write_run_config(cfg)
    engine = Engine(cfg, rank, world)
    loader = build_data(cfg, engine, rank, world)
    batches = _Batches(loader)
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep, rank, world, faults=faults)
    hook = _call_hook(cfg.eval.hook) if cfg.eval.every else None

    start, samples_seen, train_flops = 0, 0, 0.0
    if cfg.checkpoint.resume:
        try:
            tag = ckpt.resolve(cfg.checkpoint.resume)
            client = ckpt.load(engine, tag)  # a file that needs unpickling is refused here, one line
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        start, samples_seen = client["step"], client["samples_seen"]
        train_flops = float(client.get("train_flops", 0.0))  # checkpoints before train_flops existed: from 0
        loader.load_state_dict(client["loader"])
        set_rng_state(client["rng"])
        apply_changes(engine, changed, rank)
    manifests = {s.name: s.fingerprint for s in loader.sources}
    commit = git_commit()
    peak, peak_source = mfu_peak(t.peak_tflops, engine.device, engine.dtype)  # MFU's denominator and its source
    announce_lost(loader, rank)
    tracker = Tracker(cfg.tracking, run_dir, rank, flatten(to_dict(cfg)),
                      {"git_commit": commit, "world_size": str(world), "strategy": t.strategy, "mfu_peak": peak_source,
                       **{f"manifest.{k}": v for k, v in manifests.items()},
                       **{f"data.{k}": str(v) for k, v in lost_metrics(loader).items()},
                       **{f"resume.changed.{k}": f"{a} -> {b}" for k, (a, b) in changed.items()}},
                      t.steps, start, progress=t.progress)
    flops_by_group: dict[str, float] = {}  # counter source: fwd+bwd FLOPs of one optimizer step per plan group
    analytic = analytic_covers(engine.module)
    result = RunResult("finished", start)
    consecutive_bad, bad_names = 0, []

    def client_state(step: int) -> dict:
        return {"step": step, "samples_seen": samples_seen, "train_flops": train_flops,
                "loader": loader.state_dict(), "rng": rng_state(), "config": to_dict(cfg), "manifests": manifests,
                "git_commit": commit, "world_size": world,
                "data_lost": loader.lost(), "skipped_all_ranks": skipped_all_ranks(loader)}

    def save(step: int) -> None:
        ckpt.save(engine, step, client_state(step))
        faults.after_checkpoint(step)

    preempt = Preemption(run_dir, rank)  # SIGUSR1 / SIGTERM -> checkpoint at the next step boundary, stop

    step = start
    try:
        while step < t.steps:
            t0 = time.perf_counter()
            skip, names_bad, loss_sums, tokens, flops = False, [], {}, 0, 0.0
            norms = None
            for _ in range(t.grad_accum):
                batch = next(batches)
                plan = batch.get("plan")
                group = getattr(plan, "group", "all")
                if analytic:
                    names, vals, tok, bad = _micro_step(engine, batch, plan, skip)
                    flops += analytic_micro_step_flops(engine.module, cfg.model, batch, names)
                elif group not in flops_by_group:  # count model FLOPs once per plan group (fwd + bwd)
                    with engine.eager():  # counted eagerly (see Engine.eager)
                        (names, vals, tok, bad), f = _flops_of(
                            lambda b=batch, p=plan, s=skip: _micro_step(engine, b, p, s))
                    flops_by_group[group] = f * t.grad_accum
                else:
                    names, vals, tok, bad = _micro_step(engine, batch, plan, skip)
                if not analytic:
                    flops += flops_by_group[group] / t.grad_accum
                if bad:
                    skip = True
                    names_bad.extend(bad)
                for n, v in zip(names, vals.tolist()):
                    loss_sums[n] = loss_sums.get(n, 0.0) + v / t.grad_accum
                tokens += sum(tok.values())
                if engine.is_boundary() and not skip and (step + 1) % t.log_every == 0:
                    norms = engine.grad_norms()
                engine.step(skip)
            step += 1
            samples_seen += cfg.global_batch(world)
            dt = time.perf_counter() - t0
            # Global (rank-mean) losses: each rank holds its share of the global mean (losses.py contract).
            # FLOPs this step executed on all ranks (skipped steps too: their compute was spent, and samples_seen
            # counts their samples as well).
            losses, step_tokens, step_flops = reduce_step_totals(loss_sums, tokens, flops, world)
            train_flops += step_flops
            total = sum(o.weight * losses[o.name] for o in cfg.objectives if o.name in losses)
            result.losses.append({"step": step, **losses})
            if skip:
                result.skipped += 1
                consecutive_bad += 1
                bad_names = sorted(set(names_bad))
                if rank == 0:
                    print(f"medfm pretrain: step {step} skipped, non-finite loss in {', '.join(bad_names)} "
                          f"({consecutive_bad} in a row)", file=sys.stderr)
            else:
                consecutive_bad = 0
            if step % t.log_every == 0 or skip:
                metrics = {f"loss/{n}": v for n, v in losses.items()}
                metrics.update({"loss/total": total, "lr": engine.lr, "step_time_s": dt,
                                "samples_per_s": cfg.global_batch(world) / dt,
                                "tokens_per_s": step_tokens / dt, **mfu_metrics(step_flops / world / dt, peak, peak_source),
                                "flops_analytic": float(analytic), "train_flops": train_flops,
                                "skipped_steps": result.skipped, "samples_seen": samples_seen})
                if norms:
                    metrics.update({f"grad_norm/{k}": v for k, v in norms.items()})
                # Skipped samples by reason, summed over ranks: a collective, and every rank is here (log steps and
                # skipped steps are the same on all ranks).
                metrics.update(skip_metrics(loader))
                metrics.update(lost_metrics(loader))  # left out before step 1 (constant; empty when none)
                tracker.log(step, metrics)
            tracker.progress(step, {"loss": total})
            faults.at_step(step)
            if t.nan_guard and consecutive_bad >= t.nan_guard:
                last = ckpt.latest()
                result.status = "nan_stop"
                result.message = (f"stopped at step {step}: {consecutive_bad} consecutive non-finite steps in "
                                  f"{', '.join(bad_names)}; last good checkpoint: "
                                  f"{(ckpt.root / last) if last else 'none'}")
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not skip:
                save(step)
            if hook is not None and step % cfg.eval.every == 0:
                hook(engine.module.model, step, run_dir)
            if preempt.stop_requested():  # every rank, every step: all stop after the same step
                result.status, result.message = "preempted", preempt.checkpoint_and_stop(step, save, ckpt.latest())
                break
        else:
            if cfg.checkpoint.final and ckpt.latest() != f"step{step}":
                save(step)
    except BaseException:
        tracker.finish("FAILED")
        raise
    if result.status == "finished":  # MAE reconstructions PNG: every rank runs the same forwards, rank 0 writes
        from medfm.pretrain.mae_figure import write_mae_figures

        write_mae_figures(engine.module.model, cfg, run_dir, rank)
    result.step = step
    result.train_flops = train_flops
    result.run_id = tracker.run_id
    if result.status == "nan_stop" and rank == 0:
        print(f"medfm pretrain: {result.message}", file=sys.stderr)
    tracker.finish({"finished": "FINISHED", "preempted": "KILLED"}.get(result.status, "FAILED"),
                   artifacts=(run_dir / "config.yaml",))
    return result
