"""Ordered, crash-resilient fan-out of ingest tasks to worker processes.

``multiprocessing.Pool`` waits forever for a task whose worker died (a segfault in a native decoder on one
malformed file), so one input could stall the whole build. :func:`resilient_map` uses a ``ProcessPoolExecutor``
(a dead worker breaks the pool, it does not hang it), keeps a bounded window of tasks in flight and yields results
in task order (deterministic output). When the pool breaks, every task that was in flight is re-run alone in a
fresh one-process pool: the task that kills its process again is reported through ``on_crash`` and the build goes
on with a new pool.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


def resilient_map(fn, items, workers: int, initializer, initargs, on_crash, window: int | None = None):
    """Yield ``fn(item)`` for every item, in order; ``on_crash(item)`` stands in for an item whose worker died."""
    ctx = mp.get_context("spawn")  # no fork: safe with threads from BLAS / pyarrow in the parent
    items = list(items)
    window = window or 2 * workers

    def new_pool(n):
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=initializer, initargs=initargs)

    pool = new_pool(workers)
    pending: deque = deque()
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < window:
                pending.append((nxt, pool.submit(fn, items[nxt])))
                nxt += 1
            _, fut = pending[0]
            try:
                res = fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                for j, _ in list(pending):
                    solo = new_pool(1)
                    try:
                        yield solo.submit(fn, items[j]).result()
                    except BrokenProcessPool:
                        yield on_crash(items[j])
                    finally:
                        solo.shutdown(wait=False, cancel_futures=True)
                pending.clear()
                pool = new_pool(workers)
                continue
            pending.popleft()
            yield res
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
