"""A queue of run keys to reconcile, deduplicated while they wait: controller-runtime's
workqueue, for every event that concerns a run (its creation or change, its Jobs' and their
Kueue Workloads' events).

Why not a sync kopf handler per Job event: a Job changes ~6 times in its life (created,
active, ready, succeeded, complete, ...) and each event's handler held the Job's whole body
while it waited for one of kopf's handler threads. At 1000 runs that was up to 3101 Job bodies
alive at once and a reconcile (a GET of the run, a status PATCH) per event. Here the event
handler only queues the run's key and returns; a key queued again while it waits is queued
once, and a key queued while it is being reconciled is reconciled once more after (never two
reconciles of one run at once). Reconciles run in kopf's own handler threads.

kopf.event needs the context kopf sets up for a handler (its Event queue): each key keeps a
copy of the context of the handler that queued it last, and its reconcile runs in it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import logging
from collections.abc import Callable, Hashable
from typing import Any

import kopf

log = logging.getLogger("fst_operator")

RETRY_DELAY = 10.0  # seconds before a reconcile that raised is tried again


class KeyQueue:
    """Keys waiting for a worker, each at most once: urgent ones first (a run that has no Job
    yet), then in the order they were first queued. Used on the event loop's thread only
    (kopf's handlers and the workers are coroutines on it)."""

    def __init__(self) -> None:
        self._order: asyncio.PriorityQueue[tuple[int, int, Hashable]] = asyncio.PriorityQueue()
        self._queued = itertools.count()
        self._waiting: dict[Hashable, tuple[int, contextvars.Context]] = {}  # key: rank, context
        self._active: set[Hashable] = set()
        self._again: dict[Hashable, tuple[int, contextvars.Context]] = {}  # queued while active

    def __len__(self) -> int:
        return len(self._waiting)

    def add(
        self, key: Hashable, context: contextvars.Context | None = None, urgent: bool = False
    ) -> None:
        """Queue `key` unless it already waits; it keeps the context of the last caller, and
        moves ahead when it is now urgent."""
        rank = 0 if urgent else 1
        context = context or contextvars.copy_context()
        if key in self._active:
            rank = min(rank, self._again.get(key, (rank, None))[0])
            self._again[key] = (rank, context)
            return
        waiting = self._waiting.get(key)
        self._waiting[key] = (rank if waiting is None else min(rank, waiting[0]), context)
        if waiting is None or rank < waiting[0]:  # an older, lower entry is skipped in take()
            self._order.put_nowait((rank, next(self._queued), key))

    async def take(self) -> tuple[Hashable, contextvars.Context]:
        """The first waiting key; it is active until `done`."""
        while True:
            rank, _, key = await self._order.get()
            waiting = self._waiting.get(key)
            if waiting is not None and waiting[0] == rank:
                del self._waiting[key]
                self._active.add(key)
                return key, waiting[1]

    def done(self, key: Hashable) -> None:
        """`key` is reconciled; if it was queued meanwhile, it waits again."""
        self._active.discard(key)
        if key in self._again:
            rank, context = self._again.pop(key)
            self.add(key, context, urgent=rank == 0)


async def work(
    queue: KeyQueue,
    reconcile: Callable[[Any], None],
    executor: concurrent.futures.Executor,
) -> None:
    """One worker: take a key, run `reconcile(key)` in a thread of `executor` within the
    key's context, and queue it again after a delay if it raised. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        key, context = await queue.take()
        try:
            await loop.run_in_executor(executor, context.run, reconcile, key)
        except Exception as e:
            delay = getattr(e, "delay", None) or RETRY_DELAY
            if isinstance(e, kopf.TemporaryError):
                log.warning("reconcile of %s: %s; again in %.0f s", key, e, delay)
            else:
                log.exception("reconcile of %s failed; again in %.0f s", key, delay)
            loop.call_later(delay, queue.add, key, context)
        finally:
            queue.done(key)


def start(
    reconcile: Callable[[Any], None], executor: concurrent.futures.Executor, workers: int
) -> tuple[KeyQueue, list[asyncio.Task[None]]]:
    """A new queue and `workers` workers on it (`work`), on the running event loop."""
    queue = KeyQueue()
    loop = asyncio.get_running_loop()
    return queue, [loop.create_task(work(queue, reconcile, executor)) for _ in range(workers)]
