"""Linear probes on frozen features.

Two protocols, for the two regimes the literature uses:

* ``logistic`` — L-BFGS logistic regression with the L2 strength chosen on the validation split by a coarse log-grid
  then a local refinement (the CLIP paper's parametric sweep, as CLIP_benchmark's linear probe), refit on
  train+val with the chosen C. Exact and hyper-parameter-free for small and medium sets.
* ``mae`` — the MAE paper's linear probe for large sets: BatchNorm without affine parameters in front of a linear
  head, trained with LARS (or SGD) and a warm-up + cosine schedule on minibatches; features are standardised by the
  BN running statistics, so no per-dataset tuning of the learning rate is needed.

Both handle multi-class (softmax) and multi-label (one sigmoid per finding) tasks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from medfm.evals.protocols.base import FeatureSplit, ProtocolError, TaskInfo, check_train_labels, to_scores
from medfm.evals.scoring import Predictions, metric_functions

DEFAULT_SELECT = {"binary": "auroc", "multiclass": "balanced_accuracy", "ordinal": "balanced_accuracy",
                  "multilabel": "auroc_macro"}


@dataclass
class LogisticOptions:
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
    refine_steps: int = 2  # halvings of the log-step around the best C after the coarse grid
    select_metric: str = ""  # "" = the task kind's default (AUROC for binary/multi-label, balanced acc otherwise)
    max_iter: int = 1000
    refit_on_trainval: bool = True
    val_fraction: float = 0.2  # of training patients held out when the task has no validation split
    seed: int = 0


def patient_holdout(split: FeatureSplit, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, holdout) with whole patients on one side, for a validation set carved out of training data."""
    patients = np.unique(split.groups)
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(patients)[: max(1, int(round(fraction * len(patients))))].tolist())
    mask = np.array([g in held for g in split.groups])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class _Standardizer:
    def __init__(self, x: np.ndarray):
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + 1e-6

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def _fit_logistic(task: TaskInfo, x: np.ndarray, y: np.ndarray, c: float, opts: LogisticOptions):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def one(target):
        clf = LogisticRegression(C=c, max_iter=opts.max_iter, random_state=opts.seed)
        with warnings.catch_warnings():
            # A tiny C on separable data converges slowly but its solution is still the regularised optimum we want.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x, target)

    if task.kind == "multilabel":
        return [one(y[:, j]) for j in range(y.shape[1])]
    return one(y.astype(np.int64))


def _predict_logistic(task: TaskInfo, model, x: np.ndarray) -> np.ndarray:
    if task.kind == "multilabel":
        return np.stack([m.predict_proba(x)[:, 1] for m in model], axis=1)
    probs = np.zeros((len(x), task.n_outputs))
    probs[:, model.classes_] = model.predict_proba(x)  # columns in class-id order even if the solver saw fewer
    return probs


def _selection_score(task: TaskInfo, metric: str, y: np.ndarray, scores: np.ndarray) -> float:
    fns = metric_functions(task.kind, task.n_outputs, task.class_names)
    if metric not in fns:
        raise ProtocolError(f"task {task.name}: select_metric {metric!r} not in {sorted(fns)}")
    try:
        return fns[metric](y, scores)
    except ValueError:
        return -math.inf  # undefined on this validation set: never preferred


def logistic_probe(task: TaskInfo, train: FeatureSplit, val: FeatureSplit | None, test: FeatureSplit,
                   opts: LogisticOptions | None = None) -> tuple[Predictions, dict]:
    """Fit the probe (C chosen on ``val``, or on a patient hold-out of train) and predict ``test``.

    Returns the predictions and a dict of what was chosen (``C``, the validation score per C tried).
    """
    opts = opts or LogisticOptions()
    check_train_labels(task, train)
    if len(opts.c_grid) == 1 and opts.refine_steps == 0:  # fixed C: nothing to select, no data held out
        norm = _Standardizer(train.x)
        model = _fit_logistic(task, norm(train.x), train.y, float(opts.c_grid[0]), opts)
        probs = _predict_logistic(task, model, norm(test.x))
        return (Predictions(task.kind, test.y, to_scores(task, probs), test.groups, list(task.class_names)),
                {"C": float(opts.c_grid[0])})
    if val is None or len(val) == 0:
        fit_idx, hold_idx = patient_holdout(train, opts.val_fraction, opts.seed)
        fit, val = train.subset(fit_idx), train.subset(hold_idx)
    else:
        fit = train
    metric = opts.select_metric or DEFAULT_SELECT[task.kind]
    norm = _Standardizer(fit.x)
    xf, xv = norm(fit.x), norm(val.x)
    tried: dict[float, float] = {}

    def evaluate(c: float) -> float:
        if c not in tried:
            model = _fit_logistic(task, xf, fit.y, c, opts)
            tried[c] = _selection_score(task, metric, val.y, to_scores(task, _predict_logistic(task, model, xv)))
        return tried[c]

    for c in opts.c_grid:
        evaluate(float(c))
    best = max(tried, key=lambda c: (tried[c], -abs(math.log10(c))))
    step = (math.log10(opts.c_grid[1]) - math.log10(opts.c_grid[0])) / 2 if len(opts.c_grid) > 1 else 0.5
    for _ in range(opts.refine_steps):  # parametric refinement: try the midpoints in log space around the best C
        for c in (best * 10**-step, best * 10**step):
            evaluate(float(c))
        best = max(tried, key=lambda c: (tried[c], -abs(math.log10(c))))
        step /= 2
    if opts.refit_on_trainval:
        full = FeatureSplit(np.concatenate([fit.x, val.x]), np.concatenate([fit.y, val.y]),
                            np.concatenate([fit.groups, val.groups]))
    else:
        full = fit
    norm = _Standardizer(full.x)
    model = _fit_logistic(task, norm(full.x), full.y, best, opts)
    probs = _predict_logistic(task, model, norm(test.x))
    pred = Predictions(task.kind, test.y, to_scores(task, probs), test.groups, list(task.class_names))
    return pred, {"C": best, "select_metric": metric, "val_scores": {f"{c:.3g}": v for c, v in sorted(tried.items())}}


# ------------------------------------------------------------------------------------------------ MAE protocol
@dataclass
class MAEProbeOptions:
    epochs: int = 90
    # MAE's recipe: nominal batch 16384 (512 x 32 GPUs) and lr = base_lr * batch_size / 256 = 6.4. The minibatch
    # actually drawn is min(batch_size, n_train), so a small set trains full-batch at the same LARS lr: LARS bounds
    # each step to lr * trust_coefficient of the weight norm, so a much smaller lr barely moves the head.
    batch_size: int = 16384
    base_lr: float = 0.1
    weight_decay: float = 0.0
    warmup_epochs: int = 10
    optimizer: str = "lars"  # lars | sgd
    momentum: float = 0.9
    seed: int = 0


def _lars_class():
    import torch

    class LARS(torch.optim.Optimizer):
        """LARS (You et al. 2017) as in the MAE linear probe: layer-wise trust ratio on matrices, plain momentum
        SGD on vectors (biases), no weight decay on vectors."""

        def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
            super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                          trust_coefficient=trust_coefficient))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    dp = p.grad
                    if p.ndim > 1:
                        dp = dp.add(p, alpha=g["weight_decay"])
                        param_norm, update_norm = torch.norm(p), torch.norm(dp)
                        one = torch.ones_like(param_norm)
                        q = torch.where(param_norm > 0.0,
                                        torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                    one), one)
                        dp = dp.mul(q)
                    state = self.state[p]
                    if "mu" not in state:
                        state["mu"] = torch.zeros_like(p)
                    mu = state["mu"]
                    mu.mul_(g["momentum"]).add_(dp)
                    p.add_(mu, alpha=-g["lr"])

    return LARS


def mae_linear_probe(task: TaskInfo, train: FeatureSplit, val: FeatureSplit | None, test: FeatureSplit,
                     opts: MAEProbeOptions | None = None) -> tuple[Predictions, dict]:
    """Train ``BatchNorm1d(affine=False) → Linear`` on frozen features; returns test predictions and the final
    training loss (and validation loss when a validation split exists)."""
    import torch
    from torch import nn

    opts = opts or MAEProbeOptions()
    if opts.optimizer not in ("lars", "sgd"):
        raise ProtocolError(f"task {task.name}: mae probe optimizer must be lars|sgd, got {opts.optimizer!r}")
    check_train_labels(task, train)
    gen = torch.Generator().manual_seed(opts.seed)
    d, k = train.x.shape[1], task.n_outputs
    head = nn.Linear(d, k)
    with torch.no_grad():  # MAE: trunc_normal(std=0.01) weights, zero bias
        head.weight.copy_(torch.nn.init.trunc_normal_(torch.empty(k, d), std=0.01, generator=gen))
        head.bias.zero_()
    model = nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), head)
    lr = opts.base_lr * opts.batch_size / 256
    if opts.optimizer == "lars":
        optim = _lars_class()(head.parameters(), lr=lr, weight_decay=opts.weight_decay, momentum=opts.momentum)
    else:
        optim = torch.optim.SGD(head.parameters(), lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    multilabel = task.kind == "multilabel"
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y.astype(np.float32 if multilabel else np.int64))
    n = len(x)
    batch = min(opts.batch_size, n)
    steps_per_epoch = max(1, math.ceil(n / batch))
    total, warm = opts.epochs * steps_per_epoch, opts.warmup_epochs * steps_per_epoch
    step, loss = 0, torch.tensor(0.0)
    model.train()
    for _ in range(opts.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            if len(idx) < 2:  # BatchNorm needs two samples to form batch statistics
                continue
            # Per-step schedule (MAE's adjust_learning_rate): linear warm-up then half-cosine to 0.
            scale = step / max(warm, 1) if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
            for g in optim.param_groups:
                g["lr"] = lr * scale
            loss = loss_fn(model(x[idx]), y[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            step += 1
    model.eval()
    info = {"train_loss": float(loss.detach()), "lr": lr, "steps": step}
    with torch.no_grad():
        if val is not None and len(val):
            yv = torch.from_numpy(val.y.astype(np.float32 if multilabel else np.int64))
            info["val_loss"] = float(loss_fn(model(torch.from_numpy(val.x)), yv))
        logits = model(torch.from_numpy(test.x))
        probs = (torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).double().numpy()
    return Predictions(task.kind, test.y, to_scores(task, probs), test.groups, list(task.class_names)), info
