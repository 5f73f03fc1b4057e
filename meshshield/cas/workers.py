"""The CAS's worker threads: run a call off the event loop, hand its result back.

`loop.run_in_executor` over a `ThreadPoolExecutor` pays for two futures per call (a
`concurrent.futures.Future` with its own lock and condition, chained to an asyncio
one by callbacks); a CAS does two such hand-offs per certificate. Here a call is one
queue entry and one `call_soon_threadsafe` that settles the asyncio future directly.
Semantics are those of `run_in_executor`: calls run in submission order on up to
`workers` threads; a call whose awaiter was cancelled before it started is not run;
after `shutdown` (which waits for the calls already queued) nothing more is taken.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class WorkerPool:
    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)`; the future (of the running loop) gets its result."""
        loop = asyncio.get_running_loop()
        if not self._started:
            self._start()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:  # never queued behind the sentinels of shutdown
            if self._closed:
                raise RuntimeError("the CAS's workers are shut down: no new work is taken")
            self._queue.put((loop, fut, fn, args))
        return fut

    def _start(self) -> None:
        with self._lock:
            if not self._started and not self._closed:
                for t in self._threads:
                    t.start()
                self._started = True

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            if fut.done():  # its awaiter was cancelled before the call started
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiter, as executors do
                ok, value = False, e
            else:
                ok, value = True, result
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            except RuntimeError:
                pass  # the loop is closed: no one is waiting any more
            del item, fut, value

    def shutdown(self) -> None:
        """Take no more work, finish what is queued, and wait for the threads."""
        with self._lock:
            self._closed = True
            started = self._started
            if started:
                for _ in self._threads:
                    self._queue.put(None)
        if started:
            for t in self._threads:
                t.join()
