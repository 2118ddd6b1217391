"""What the data loader lost or skipped, as the training loop reports it: summed over ranks (medfm.shards never
issues collectives for this; it hands back each rank's own counters and this module sums them through
medfm.pretrain.collectives)."""

from __future__ import annotations

import sys

from medfm.pretrain.collectives import sum_counts


def skipped_all_ranks(loader) -> dict[str, int]:
    """Samples skipped at read time by reason, summed over ranks (a collective: every rank must call it)."""
    return sum_counts(loader.counters.as_dict())


def skip_metrics(loader) -> dict[str, int]:
    """``skipped_<reason>`` metrics, summed over ranks (a collective)."""
    return {f"skipped_{reason}": n for reason, n in skipped_all_ranks(loader).items()}


def lost_metrics(loader) -> dict[str, int]:
    """``lost/<source>/<reason>``: samples left out before step 1 (shards failing the check, with
    ``data.on_missing_shard: skip``). The same on every rank: every rank checks the same files."""
    return {f"lost/{src}/{reason}": n for src, by in loader.lost().items() for reason, n in by.items()}


def announce_lost(loader, rank: int) -> None:
    """One line on rank 0 before step 1 when samples were left out, so the loss is never silent."""
    lost = loader.lost()
    if rank == 0 and lost:
        total = sum(n for by in lost.values() for n in by.values())
        print(f"medfm pretrain: data.on_missing_shard=skip: {total} samples left out before step 1 "
              f"(per source and reason: {lost})", file=sys.stderr)
