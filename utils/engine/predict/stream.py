"""Frames in flight: run a per-frame function on worker threads and hand the results back in input order.

Why: a batch-1 CPU forward of a small detector spreads each operator over all cores and waits at the end of
every operator for the slowest thread, while Python glue between operators runs on one. Several frames at once,
each forward on its own thread with a share of the cores, need no such waits: on 2 cores two single-thread
forwards finish more frames per second than one two-thread forward, and beside a busy neighbour a slowed
worker delays only its own frame (benchmarks/results/detect_pipeline.md). Order is kept, so trackers, label
files and the written video see frames exactly as a sequential run would.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int | None = None,
                initializer: Callable[[], None] | None = None) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(item)) in the order of `items`, with up to `workers` calls of fn running at once on
    worker threads, while the caller draws the next items (so with one worker, fn overlaps the caller's work).

    At most `depth` (default workers + 1) items are submitted and not yet handed back, so memory stays flat
    however long the input. Items are drawn from `items` in the caller's thread. An exception raised by fn
    reaches the caller when its item's turn comes, one raised by `items` after the results of the items before
    it (earlier results first, as in a plain loop). Closing the generator early (a
    `break` in the consumer) cancels what has not started and waits for what has. workers = 0: a plain loop in
    the caller's thread. initializer runs once in each worker thread (e.g. to set its torch thread count).
    """
    if workers <= 0:
        for it in items:
            yield it, fn(it)
        return
    depth = max(int(depth or workers + 1), 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frame-worker", initializer=initializer)
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)
    try:
        while True:
            try:
                it = next(source)
            except StopIteration:
                break
            except Exception:  # the input failed: first the results of what it gave before, then its error
                while pending:
                    first, fut = pending.popleft()
                    yield first, fut.result()
                raise
            pending.append((it, pool.submit(fn, it)))
            if len(pending) >= depth:
                first, fut = pending.popleft()
                yield first, fut.result()
        while pending:
            first, fut = pending.popleft()
            yield first, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
