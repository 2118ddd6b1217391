"""The training loop's throughput bookkeeping (torchtitan's metrics processor): losses, tokens, FLOPs, MFU, samples.

FLOPs have one definition, :mod:`medfm.pretrain.step_flops` (model_zoo formulas at the shapes each micro-batch ran),
which a sweep also uses for its compute budgets; ``train_flops`` is their sum over ranks and steps, skipped steps
included (their compute was spent, and ``samples_seen`` counts their samples too), carried across resumes.
"""

from __future__ import annotations

import time

from medfm.pretrain import collectives
from medfm.pretrain.peak_flops import mfu_metrics
from medfm.pretrain.step_flops import formulas_cover, micro_batch_flops


def reduce_step_totals(loss_sums: dict[str, float], tokens: float, flops: float, world: int):
    """(rank-mean losses, tokens, FLOPs) of one step over all ranks: one float64 all-reduce (collectives places it).
    Each rank holds its share of the global mean loss (losses.py contract), so the sum over ranks / world is it."""
    names = sorted(loss_sums)
    vec = collectives.reduce_floats([loss_sums[n] for n in names] + [float(tokens), float(flops)])
    return {n: vec[i] / world for i, n in enumerate(names)}, vec[-2], vec[-1]


class TrainMetrics:
    """One step's sums (``start_step`` / ``add_micro`` / ``end_step``) and the run's running totals.

    ``peak`` / ``peak_source`` are MFU's denominator (peak_flops.mfu_peak); ``train_flops`` and ``samples_seen``
    start from a checkpoint's values on resume."""

    def __init__(self, module, cfg, world: int, peak: float | None, peak_source: str, train_flops: float = 0.0,
                 samples_seen: int = 0):
        self.module, self.model_cfg, self.world = module, cfg.model, world
        self.grad_accum = cfg.grad_accum(world)  # RunConfig owns the rule (train.grad_accum, or derived when 0)
        self.samples_per_step = cfg.global_batch(world)
        self.peak, self.peak_source = peak, peak_source
        self.analytic = formulas_cover([o.cfg for o in module.objectives])
        self._per_sample: dict = {}  # micro_batch_flops' memo
        self.train_flops, self.samples_seen = float(train_flops), int(samples_seen)
        self.step_time = self.step_tokens = self.step_flops = 0.0
        self.start_step()

    def start_step(self) -> None:
        self._t0 = time.perf_counter()
        self._loss_sums: dict[str, float] = {}
        self._tokens, self._flops = 0, 0.0

    def add_micro(self, batch: dict, names, vals, tokens: dict) -> None:
        """One micro-batch on this rank: its loss values (averaged over the step), tokens and FLOPs."""
        self._flops += micro_batch_flops(self.module, self.model_cfg, batch, names, self._per_sample)
        for n, v in zip(names, vals.tolist()):
            self._loss_sums[n] = self._loss_sums.get(n, 0.0) + v / self.grad_accum
        self._tokens += sum(tokens.values())

    def end_step(self) -> dict[str, float]:
        """Close the step: the global (rank-mean) losses; tokens and FLOPs summed over ranks into the totals."""
        self.samples_seen += self.samples_per_step
        self.step_time = time.perf_counter() - self._t0
        losses, self.step_tokens, self.step_flops = reduce_step_totals(self._loss_sums, self._tokens, self._flops,
                                                                       self.world)
        self.train_flops += self.step_flops
        return losses

    def throughput(self) -> dict[str, float]:
        """The last step's rates and the run's FLOPs, under the names metrics.jsonl / mlflow have always used."""
        dt = self.step_time
        return {"step_time_s": dt, "samples_per_s": self.samples_per_step / dt, "tokens_per_s": self.step_tokens / dt,
                **mfu_metrics(self.step_flops / self.world / dt, self.peak, self.peak_source),
                "flops_analytic": float(self.analytic), "train_flops": self.train_flops}
