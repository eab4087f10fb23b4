"""The operator's queue of runs to reconcile (operator/fst_operator/workqueue.py): a key is
queued once while it waits, never reconciled twice at once, reconciled again when it was queued
during its reconcile, retried after an error, and reconciled in its last queuer's context (where
kopf keeps its Event queue)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
import time

import kopf
from fst_operator import workqueue

WHO = contextvars.ContextVar("who", default="nobody")


def test_a_waiting_key_is_queued_once_in_first_come_order():
    async def main() -> list:
        queue = workqueue.KeyQueue()
        for key in ["a", "b", "a", "c", "b"]:
            queue.add(key)
        assert len(queue) == 3
        return [(await queue.take())[0] for _ in range(3)]

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_an_urgent_key_goes_first_and_a_waiting_key_can_become_urgent():
    async def main() -> list:
        queue = workqueue.KeyQueue()
        queue.add("old")
        queue.add("older-but-now-urgent")
        queue.add("new", urgent=True)
        queue.add("older-but-now-urgent", urgent=True)
        queue.add("new")  # queued again, not urgent: stays where it is
        assert len(queue) == 3
        return [(await queue.take())[0] for _ in range(3)] + [queue._order.qsize()]

    # Each key once; the stale entry of the upgraded key is skipped when met (one left over).
    assert asyncio.run(main()) == ["new", "older-but-now-urgent", "old", 1]


def test_a_key_queued_during_its_reconcile_is_reconciled_once_more_after_never_alongside():
    seen: list[str] = []
    running: set[str] = set()
    overlap = threading.Event()

    def reconcile(key: str) -> None:
        if key in running:
            overlap.set()
        running.add(key)
        seen.append(f"{key}:{WHO.get()}")
        time.sleep(0.05)
        running.discard(key)

    async def main() -> None:
        queue = workqueue.KeyQueue()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            workers = [
                asyncio.create_task(workqueue.work(queue, reconcile, pool)) for _ in range(4)
            ]
            WHO.set("first")
            queue.add("run")
            await asyncio.sleep(0.02)  # a worker has it now
            for who in ("second", "third"):  # both arrive during the reconcile: one more after
                WHO.set(who)
                queue.add("run")
            await asyncio.sleep(0.2)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    asyncio.run(main())
    assert seen == ["run:first", "run:third"] and not overlap.is_set()


def test_a_reconcile_that_raises_is_tried_again_after_its_delay():
    attempts: list[float] = []

    def reconcile(key: str) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise kopf.TemporaryError("the database is not there yet", delay=0.1)

    async def main() -> None:
        queue = workqueue.KeyQueue()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            worker = asyncio.create_task(workqueue.work(queue, reconcile, pool))
            queue.add("run")
            await asyncio.sleep(0.4)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    asyncio.run(main())
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.1
