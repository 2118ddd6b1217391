"""Deterministic, counter-based randomness and weighted mixing.

Everything the loader decides (which source fills a batch slot, which sample replaces a corrupt one, which group a
step trains) is a pure function of integers such as (seed, step, slot). No RNG state is carried from one step to the
next, so any rank, any DataLoader worker, and a run resumed at step k compute the same answer without talking to
each other and without replaying history.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MASK = (1 << 64) - 1

# Domain tags keep the streams of different decisions independent even for equal (seed, step) pairs.
TAG_MIX = 0x6D6978           # "mix"
TAG_PLAN = 0x706C616E        # "plan"
TAG_ORDER = 0x6F72646572     # "order"
TAG_REPLACE = 0x7265706C     # "repl"
TAG_AUGMENT = 0x617567       # "aug"


def splitmix64(x: int) -> int:
    """One round of SplitMix64: a fast bijective 64-bit mixer with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    """A 64-bit hash of a tuple of integers (negative values allowed)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = splitmix64(h ^ (int(v) & _MASK))
    return h


def uniform(*values: int) -> float:
    """A float in [0, 1) determined by ``values``."""
    return (hash_ints(*values) >> 11) * (1.0 / (1 << 53))


def rng_for(*values: int) -> np.random.Generator:
    """A numpy Generator seeded by ``values`` (for vectorised draws such as permutations)."""
    return np.random.Generator(np.random.PCG64(hash_ints(*values)))


def normalize_weights(weights: Sequence[float], what: str = "weights") -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError(f"{what}: expected a non-empty list of numbers")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what}: must be finite, >= 0 and not all 0, got {list(w)}")
    return w / w.sum()


def pick(weights: np.ndarray, *key: int) -> int:
    """One index drawn with probabilities ``weights`` (normalised), determined by ``key``."""
    u = uniform(*key)
    return int(min(np.searchsorted(np.cumsum(weights), u, side="right"), len(weights) - 1))


def allocate(weights: np.ndarray, n: int, *key: int) -> np.ndarray:
    """Assign each of ``n`` batch slots to a source, proportionally to ``weights``, determined by ``key``.

    Systematic sampling: the counts per source are within one of ``n * w`` in every batch (a multinomial draw
    would let a 10% source vary from 0 to 30% of a small batch), the expected count is exactly ``n * w``, and the
    slots are then permuted so no source is tied to particular ranks.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    cdf = np.cumsum(weights)
    cdf[-1] = 1.0
    points = (uniform(*key, 0) + np.arange(n)) / n
    src = np.minimum(np.searchsorted(cdf, points, side="right"), len(weights) - 1)
    return rng_for(*key, 1).permutation(src).astype(np.int64)
