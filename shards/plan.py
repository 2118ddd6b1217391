"""Modality-aware step plans: which modalities and objectives one optimizer step runs.

Under ZeRO-3 every rank must run the same towers in the same order, or the parameter all-gathers of one rank wait
forever for a tower another rank skipped (the mixed-multimodal hang of DeepSpeed issue #7170). The plan of step
``s`` is therefore a pure function of ``(PlanConfig, s)``: every rank computes the identical plan locally, with no
collective, before the forward. The loader then fills the batch for exactly that plan (a sample that lacks a planned
modality contributes zeros and ``<m>_present=False``, never a missing key).

Policies:
- ``all``: every configured modality and objective every step.
- ``round_robin``: one group per step, groups in turn (``step % n_groups``).
- ``weighted``: one group per step, drawn with the groups' weights from a hash of (seed, step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medfm.shards.manifest import MODALITIES
from medfm.shards.mix import TAG_PLAN, normalize_weights, pick

POLICIES = ("all", "round_robin", "weighted")


@dataclass
class GroupConfig:
    """A modality group: the modalities one step sees together and the objectives that train on them."""

    name: str
    modalities: list[str]
    objectives: list[str] = field(default_factory=list)
    weight: float = 1.0

    def validate(self):
        if not self.name:
            raise ValueError("group name must be non-empty")
        if not self.modalities:
            raise ValueError(f"group {self.name!r}: modalities must be non-empty")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ValueError(f"group {self.name!r}: unknown modality {m!r} (expected one of {list(MODALITIES)})")
        if not self.weight >= 0:
            raise ValueError(f"group {self.name!r}: weight must be >= 0, got {self.weight}")


@dataclass
class PlanConfig:
    """``groups`` empty = one group "all" holding every modality of the data (the loader fills it in)."""

    policy: Literal["all", "round_robin", "weighted"] = "all"
    groups: list[GroupConfig] = field(default_factory=list)
    seed: int = 0

    def validate(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.policy != "all" and not self.groups:
            raise ValueError(f"policy {self.policy!r} needs plan.groups (one modality group per step)")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"plan.groups: duplicate group name in {names}")
        for g in self.groups:
            g.validate()
        if self.policy == "weighted":
            normalize_weights([g.weight for g in self.groups], "plan.groups weights")


@dataclass(frozen=True)
class StepPlan:
    """What step ``step`` runs. ``modalities`` are in canonical order; ``group`` is the group name or "all"."""

    step: int
    modalities: tuple[str, ...]
    objectives: tuple[str, ...]
    group: str

    def to_dict(self) -> dict:
        return {"step": self.step, "modalities": list(self.modalities), "objectives": list(self.objectives),
                "group": self.group}


def _canonical(mods) -> tuple[str, ...]:
    mods = set(mods)
    return tuple(m for m in MODALITIES if m in mods)


def _ordered_union(lists) -> tuple[str, ...]:
    out: list[str] = []
    for items in lists:
        for x in items:
            if x not in out:
                out.append(x)
    return tuple(out)


class StepPlanner:
    """``planner(step) -> StepPlan``; ``planner.group_index(step)`` is the group used (None for policy "all")."""

    def __init__(self, config: PlanConfig):
        config.validate()
        if not config.groups:
            raise ValueError("plan.groups must list at least one modality group")
        self.config = config
        self.groups = list(config.groups)
        self._weights = (normalize_weights([g.weight for g in self.groups], "plan.groups weights")
                         if config.policy == "weighted" else None)
        self._all = StepPlan(-1, _canonical(m for g in self.groups for m in g.modalities),
                             _ordered_union(g.objectives for g in self.groups), "all")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every modality any step can contain (canonical order)."""
        return self._all.modalities

    def group_index(self, step: int) -> int | None:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        policy = self.config.policy
        if policy == "all":
            return None
        if policy == "round_robin":
            return step % len(self.groups)
        return pick(self._weights, self.config.seed, TAG_PLAN, step)

    def __call__(self, step: int) -> StepPlan:
        gi = self.group_index(step)
        if gi is None:
            return StepPlan(step, self._all.modalities, self._all.objectives, "all")
        g = self.groups[gi]
        return StepPlan(step, _canonical(g.modalities), tuple(dict.fromkeys(g.objectives)), g.name)
