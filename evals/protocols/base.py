"""What every protocol consumes: frozen features of one split with its labels and patient ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medfm.evals.scoring import TASK_KINDS


class ProtocolError(ValueError):
    """The task's data cannot be evaluated with this protocol (e.g. a class with no training sample)."""


@dataclass
class FeatureSplit:
    """``x`` [n, d] float32 features; ``y`` int class ids [n], 0/1 indicators [n, L], or survival times [n] (with
    ``event``); ``groups`` patient ids [n] (bootstrap clusters); ``keys`` the shard sample keys."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    keys: list[str] = field(default_factory=list)
    event: np.ndarray | None = None

    def __post_init__(self):
        self.x = np.asarray(self.x, dtype=np.float32)
        self.y = np.asarray(self.y)
        self.groups = np.asarray(self.groups)
        if self.x.ndim != 2:
            raise ProtocolError(f"features must be [n, d], got shape {self.x.shape}")
        if not (len(self.x) == len(self.y) == len(self.groups)):
            raise ProtocolError(f"features/labels/groups lengths differ: {len(self.x)}/{len(self.y)}/{len(self.groups)}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx) -> FeatureSplit:
        idx = np.asarray(idx)
        return FeatureSplit(self.x[idx], self.y[idx], self.groups[idx], [self.keys[i] for i in idx] if self.keys else [],
                            None if self.event is None else self.event[idx])


@dataclass
class TaskInfo:
    """The label side of a task: its kind and class (or finding) names, in score-column order."""

    name: str
    kind: str
    class_names: list[str]

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ProtocolError(f"task {self.name}: kind must be one of {list(TASK_KINDS)}, got {self.kind!r}")

    @property
    def n_outputs(self) -> int:
        return len(self.class_names)


def check_train_labels(task: TaskInfo, train: FeatureSplit) -> None:
    """Every class (or both values of every finding) must occur in the training split, else the probe is
    ill-posed; say which class is missing rather than let a solver fail obscurely."""
    if len(train) == 0:
        raise ProtocolError(f"task {task.name}: the training split is empty")
    if task.kind in ("binary", "multiclass", "ordinal"):
        counts = np.bincount(train.y.astype(np.int64), minlength=task.n_outputs)
        missing = [task.class_names[i] for i in np.flatnonzero(counts[: task.n_outputs] == 0)]
        if missing:
            raise ProtocolError(f"task {task.name}: class {missing[0]!r} has no training samples "
                                f"(train class counts {dict(zip(task.class_names, counts.tolist()))})")
    elif task.kind == "multilabel":
        pos = train.y.sum(axis=0)
        for j, name in enumerate(task.class_names):
            if pos[j] == 0 or pos[j] == len(train):
                value = "positive" if pos[j] == len(train) else "negative"
                raise ProtocolError(f"task {task.name}: finding {name!r} is {value} in every training sample")


def to_scores(task: TaskInfo, probs: np.ndarray) -> np.ndarray:
    """Protocol output [n, K] → the score layout of Predictions (binary keeps only P(positive))."""
    return probs[:, 1] if task.kind == "binary" else probs


@dataclass
class Row:
    """One line of the report: a metric of a task under a protocol, with its CI (or the reason it is undefined)."""

    metric: str
    estimate: object  # medfm.evals.bootstrap.Estimate | str (undefined: the one-line reason)
    params: dict = field(default_factory=dict)  # e.g. {"shots": 4} or {"direction": "image->text"}


@dataclass
class ProtocolResult:
    rows: list[Row]
    predictions: object = None  # Predictions, for ROC/PR curves
    info: dict = field(default_factory=dict)  # what the protocol chose (C, k, epochs, ...)
