"""Read-time fault tolerance: a bad sample is skipped, counted by reason, and replaced — never a crash or a hang.

Reasons are the stable strings of :data:`medfm.shards.sample.REASONS` (what decoding rejects: bad .npy, NaN/Inf,
wrong shapes, missing members, unknown modality, ...) plus the read-level ones below, so ``medfm shards verify``,
``inspect`` and the training logs count the same thing under the same name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from medfm.shards.sample import REASONS, Sample, SampleError, decode_sample

# Read-level reasons (the tar or the shard, not one sample's content, is at fault).
READ_REASONS = (
    "missing_shard",     # the shard file / URL could not be opened
    "unreadable_shard",  # not a tar at all (garbage bytes, wrong format)
    "truncated",         # the tar ends before this sample (or inside one of its members)
    "split_mismatch",    # a sample found where the manifest said another split lives (stale manifest)
    "checksum_mismatch",  # a member's bytes differ from the manifest's per-member [bytes, crc32]
)
ALL_REASONS = READ_REASONS + REASONS


class ReadError(Exception):
    """The bytes of a sample could not be read; ``reason`` is one of READ_REASONS."""

    def __init__(self, reason: str, message: str = ""):
        assert reason in READ_REASONS, reason
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}" if message else reason)


class ReplacementExhausted(RuntimeError):
    """Too many consecutive bad samples for one slot: the dataset is mostly corrupt, stop with a clear message."""


class SkipCounters:
    """Counts of skipped samples by reason, plus the last few messages for the log."""

    def __init__(self, counts: Mapping[str, int] | None = None, keep_examples: int = 8):
        self.counts: Counter = Counter(counts or {})
        self.examples: list[str] = []
        self.keep_examples = keep_examples

    def add(self, reason: str, message: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        if message and len(self.examples) < self.keep_examples:
            self.examples.append(f"{reason}: {message}")

    def update(self, other: Mapping[str, int]) -> None:
        for k, v in other.items():
            self.counts[k] += int(v)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Non-zero counts in the stable reason order (unknown reasons last, sorted)."""
        known = [r for r in ALL_REASONS if self.counts.get(r)]
        extra = sorted(r for r in self.counts if r not in ALL_REASONS and self.counts[r])
        return {r: int(self.counts[r]) for r in known + extra}

    def __repr__(self) -> str:
        return f"SkipCounters({self.as_dict()})"


def decode_or_reason(members: Mapping) -> tuple[Sample | None, str | None, str]:
    """``(sample, None, "")`` for a good sample, ``(None, reason, message)`` for a bad one."""
    try:
        return decode_sample(dict(members)), None, ""
    except SampleError as exc:
        return None, exc.reason, str(exc)
