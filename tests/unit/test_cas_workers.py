"""The CAS's worker threads (cas/workers.py): results, errors, order, cancellation and
shutdown behave as run_in_executor's over a thread pool."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshshield.cas.workers import WorkerPool


def test_results_and_errors_reach_the_awaiter_from_a_worker_thread() -> None:
    async def main() -> None:
        pool = WorkerPool(4, "t-work")
        try:
            name = await pool.submit(lambda: threading.current_thread().name)
            assert name.startswith("t-work_") and name != threading.current_thread().name
            assert await asyncio.gather(*(pool.submit(pow, i, 2) for i in range(50))) == [
                i * i for i in range(50)]
            with pytest.raises(ZeroDivisionError):
                await pool.submit(divmod, 1, 0)
            assert await pool.submit(sum, (1, 2)) == 3  # the worker survived the error
        finally:
            pool.shutdown()

    asyncio.run(main())


def test_a_call_cancelled_before_it_starts_is_not_run() -> None:
    ran: list[int] = []

    async def main() -> None:
        pool = WorkerPool(1, "t-work")
        gate = threading.Event()
        try:
            first = pool.submit(gate.wait, 10)
            second = pool.submit(ran.append, 2)
            second.cancel()
            gate.set()
            assert await first is True
            assert await pool.submit(ran.append, 3) is None  # queued after: runs after
        finally:
            pool.shutdown()

    asyncio.run(main())
    assert ran == [3]


def test_shutdown_finishes_queued_work_then_refuses_more() -> None:
    done: list[int] = []

    async def main() -> None:
        pool = WorkerPool(2, "t-work")
        futures = [pool.submit(done.append, i) for i in range(20)]
        await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        assert sorted(done) == list(range(20))
        await asyncio.gather(*futures)
        with pytest.raises(RuntimeError, match="shut down"):
            pool.submit(done.append, 99)
        assert all(not t.is_alive() for t in pool._threads)

    asyncio.run(main())
    assert 99 not in done
