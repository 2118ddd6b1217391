"""The training loop, torchtitan's shape: ``run`` builds a :class:`Trainer` and calls ``train``, which reads top to
bottom — ``train_step`` (one optimizer step), ``log_step``, the NaN guard, ``maybe_checkpoint``, the eval hook,
preemption. Throughput (losses, tokens, FLOPs, MFU, samples) belongs to ``metrics.TrainMetrics``.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medfm.pretrain import collectives
from medfm.pretrain.checkpoint import CheckpointManager, git_commit, rng_state, set_rng_state
from medfm.pretrain.config import RunConfig, write_run_config
from medfm.pretrain.data_report import announce_lost, lost_metrics, skip_metrics, skipped_all_ranks
from medfm.pretrain.engine import Engine, init_distributed, setup_environment
from medfm.pretrain.faults import FaultInjector
from medfm.pretrain.metrics import TrainMetrics, reduce_step_totals  # noqa: F401 (reduce_step_totals: re-export)
from medfm.pretrain.peak_flops import measure_peak_flops, mfu_metrics, mfu_peak  # noqa: F401 (re-export)
from medfm.pretrain.preemption import Preemption
from medfm.pretrain.reshard import keep_global_batch
from medfm.pretrain.resume_config import apply_changes, resume_changes, saved_config
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


def _refuse_or_resume_changes(cfg: RunConfig, run_dir: Path, rank: int, world: int) -> dict:
    """Refuse a fresh run in a directory holding an earlier run's checkpoints, and a resume that changes what may
    not change — both before config.yaml is rewritten. Returns the allowed changes of a resume."""
    earlier = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep, rank, world).complete_tags()
    if not cfg.checkpoint.resume and earlier:
        # A fresh run would interleave its checkpoints with the old run's, prune by step number across both, and
        # could move "latest" onto a pruned tag: refuse before anything is written.
        raise ConfigError(f"run_dir {run_dir} already holds checkpoints ({', '.join(earlier[-2:])}) of an earlier "
                          "run: pass checkpoint.resume=latest to continue it, or a new name/run_dir")
    if not cfg.checkpoint.resume:
        return {}
    return resume_changes(cfg, *saved_config(CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep, rank,
                                                               world), cfg.checkpoint.resume, rank), world)




class Trainer:
    """One rank's training run: ``__init__`` builds everything (and restores a checkpoint), ``train`` runs it."""

    def __init__(self, cfg: RunConfig):
        setup_environment()
        self.rank, self.world = rank, world = init_distributed()
        try:
            self.faults = FaultInjector.from_env(rank)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        keep_global_batch(cfg, world)  # a ZeRO-3 resume at another world size keeps the global batch sequence
        cfg.resolve_world(world)  # batch arithmetic for this world; a derived grad_accum (0) becomes its number
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        changed = _refuse_or_resume_changes(cfg, self.run_dir, rank, world)
        if rank == 0:  # the config this run trains with (a launch wrote the same text already: then no write)
            write_run_config(cfg)
        self.engine = Engine(cfg, rank, world)
        self.loader = build_data(cfg, self.engine, rank, world)
        self.batches = _Batches(self.loader)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep, rank, world,
                                      faults=self.faults)
        self.hook = _call_hook(cfg.eval.hook) if cfg.eval.every else None
        start, samples_seen, train_flops = self._restore(changed)
        self.manifests = {s.name: s.fingerprint for s in self.loader.sources}
        self.commit = git_commit()
        peak, peak_source = mfu_peak(cfg.train.peak_tflops, self.engine.device, self.engine.dtype)
        announce_lost(self.loader, rank)
        self.tracker = self._tracker(changed, start, peak_source)
        self.metrics = TrainMetrics(self.engine.module, cfg, world, peak, peak_source, train_flops, samples_seen)
        self.result = RunResult("finished", start)
        self.consecutive_bad, self.bad_names = 0, []
        self.preempt = Preemption(self.run_dir, rank)  # SIGUSR1 / SIGTERM -> checkpoint at the next step boundary

    def _restore(self, changed: dict) -> tuple[int, int, float]:
        """(start step, samples seen, train FLOPs) — from the checkpoint ``checkpoint.resume`` names, else zeros."""
        if not self.cfg.checkpoint.resume:
            return 0, 0, 0.0
        try:
            tag = self.ckpt.resolve(self.cfg.checkpoint.resume)
            client = self.ckpt.load(self.engine, tag)  # a file that needs unpickling is refused here, one line
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.loader.load_state_dict(client["loader"])
        set_rng_state(client["rng"])
        apply_changes(self.engine, changed, self.rank)
        # checkpoints written before train_flops existed: from 0
        return client["step"], client["samples_seen"], float(client.get("train_flops", 0.0))

    def _tracker(self, changed: dict, start: int, peak_source: str) -> Tracker:
        t = self.cfg.train
        tags = {"git_commit": self.commit, "world_size": str(self.world), "strategy": t.strategy,
                "mfu_peak": peak_source, **{f"manifest.{k}": v for k, v in self.manifests.items()},
                **{f"data.{k}": str(v) for k, v in lost_metrics(self.loader).items()},
                **{f"resume.changed.{k}": f"{a} -> {b}" for k, (a, b) in changed.items()}}
        return Tracker(self.cfg.tracking, self.run_dir, self.rank, flatten(to_dict(self.cfg)), tags, t.steps, start,
                       progress=t.progress)

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self) -> RunResult:
        t, step = self.cfg.train, self.result.step
        try:
            while step < t.steps:
                losses, skip, norms, bad = self.train_step(step)
                step += 1
                self.count_skip(step, skip, bad)
                self.log_step(step, losses, skip, norms)
                self.faults.at_step(step)
                if self.nan_stop(step):
                    break
                self.maybe_checkpoint(step, skip)
                if self.hook is not None and step % self.cfg.eval.every == 0:
                    self.hook(self.engine.module.model, step, self.run_dir)
                if self.preempt.stop_requested():  # every rank, every step: all stop after the same step
                    self.result.status = "preempted"
                    self.result.message = self.preempt.checkpoint_and_stop(step, self.save, self.ckpt.latest())
                    break
            else:
                if self.cfg.checkpoint.final and self.ckpt.latest() != f"step{step}":
                    self.save(step)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        return self.finish(step)

    def train_step(self, step: int) -> tuple[dict, bool, dict | None, list[str]]:
        """Optimizer step ``step + 1`` (``grad_accum`` micro-batches) -> (global losses, skipped, per-group grad norms
        on a log step, names of the objectives whose loss was non-finite)."""
        t, engine = self.cfg.train, self.engine
        self.metrics.start_step()
        skip, bad_names, norms = False, [], None
        for _ in range(t.grad_accum):
            batch = next(self.batches)
            names, vals, tok, bad = _micro_step(engine, batch, batch.get("plan"), skip)
            self.metrics.add_micro(batch, names, vals, tok)
            if bad:
                skip = True
                bad_names.extend(bad)
            if engine.is_boundary() and not skip and (step + 1) % t.log_every == 0:
                norms = engine.grad_norms()
            engine.step(skip)
        return self.metrics.end_step(), skip, norms, sorted(set(bad_names))

    def count_skip(self, step: int, skip: bool, bad: list[str]) -> None:
        if not skip:
            self.consecutive_bad = 0
            return
        self.result.skipped += 1
        self.consecutive_bad += 1
        self.bad_names = bad
        if self.rank == 0:
            print(f"medfm pretrain: step {step} skipped, non-finite loss in {', '.join(bad)} "
                  f"({self.consecutive_bad} in a row)", file=sys.stderr)

    def log_step(self, step: int, losses: dict, skip: bool, norms: dict | None) -> None:
        """Global losses to the result; every ``log_every`` steps (and on a skipped one) the metrics record."""
        total = sum(o.weight * losses[o.name] for o in self.cfg.objectives if o.name in losses)
        self.result.losses.append({"step": step, **losses})
        if step % self.cfg.train.log_every == 0 or skip:
            metrics = {f"loss/{n}": v for n, v in losses.items()}
            metrics.update({"loss/total": total, "lr": self.engine.lr, **self.metrics.throughput(),
                            "skipped_steps": self.result.skipped, "samples_seen": self.metrics.samples_seen})
            if norms:
                metrics.update({f"grad_norm/{k}": v for k, v in norms.items()})
            # Skipped samples by reason, summed over ranks: a collective, and every rank is here (log steps and
            # skipped steps are the same on all ranks).
            metrics.update(skip_metrics(self.loader))
            metrics.update(lost_metrics(self.loader))  # left out before step 1 (constant; empty when none)
            self.tracker.log(step, metrics)
        self.tracker.progress(step, {"loss": total})

    def nan_stop(self, step: int) -> bool:
        """After ``nan_guard`` consecutive skipped steps: stop, naming the objectives and the last good checkpoint."""
        if not (self.cfg.train.nan_guard and self.consecutive_bad >= self.cfg.train.nan_guard):
            return False
        last = self.ckpt.latest()
        self.result.status = "nan_stop"
        self.result.message = (f"stopped at step {step}: {self.consecutive_bad} consecutive non-finite steps in "
                               f"{', '.join(self.bad_names)}; last good checkpoint: "
                               f"{(self.ckpt.root / last) if last else 'none'}")
        return True

    def maybe_checkpoint(self, step: int, skip: bool) -> None:
        every = self.cfg.checkpoint.every
        if every and step % every == 0 and not skip:
            self.save(step)

    def save(self, step: int) -> None:
        self.ckpt.save(self.engine, step, self.client_state(step))
        self.faults.after_checkpoint(step)

    def client_state(self, step: int) -> dict:
        loader = self.loader
        return {"step": step, "samples_seen": self.metrics.samples_seen, "train_flops": self.metrics.train_flops,
                "loader": loader.state_dict(), "rng": rng_state(), "config": to_dict(self.cfg),
                "manifests": self.manifests, "git_commit": self.commit, "world_size": self.world,
                "data_lost": loader.lost(), "skipped_all_ranks": skipped_all_ranks(loader)}

    def finish(self, step: int) -> RunResult:
        result = self.result
        if result.status == "finished":  # MAE reconstructions PNG: every rank runs the same forwards, rank 0 writes
            from medfm.pretrain.mae_figure import write_mae_figures

            write_mae_figures(self.engine.module.model, self.cfg, self.run_dir, self.rank)
        result.step, result.train_flops, result.run_id = step, self.metrics.train_flops, self.tracker.run_id
        if result.status == "nan_stop" and self.rank == 0:
            print(f"medfm pretrain: {result.message}", file=sys.stderr)
        self.tracker.finish({"finished": "FINISHED", "preempted": "KILLED"}.get(result.status, "FAILED"),
                            artifacts=(self.run_dir / "config.yaml",))
        return result


def run(cfg: RunConfig) -> RunResult:
    """Train ``cfg`` as one rank of the current torchrun world (or alone)."""
    return Trainer(cfg).train()
