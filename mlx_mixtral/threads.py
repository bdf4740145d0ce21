"""Threads that run MLX work, and how they end.

MLX keeps state per thread (its streams, and compiled functions that hold Python objects). A
thread that ran MLX work must drop that state before it ends, while it still holds the
interpreter: left to the thread's exit, it is torn down after Python began to finalize, and the
process aborts ("terminate called without an active exception", exit 134; mlx#4327).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def release() -> None:
    """Drop this thread's MLX state: the last thing a thread that ran MLX work does."""
    import mlx.core as mx

    mx.clear_streams()


class MlxThread:
    """One thread for MLX work: jobs run in the order they were submitted; `close()` lets it
    release MLX's state and end."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, job, args))
        return future

    def close(self, cancel: bool = False) -> None:
        """End the thread after the jobs that wait (`cancel`: after the running one only)."""
        if cancel:
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        _work(self._jobs.get)


class MlxPool:
    """Several threads for MLX work taking jobs from one queue, the lower `priority` first
    (then in the order submitted); `close()` lets each release MLX's state and end."""

    def __init__(self, name: str, threads: int) -> None:
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def size(self) -> int:
        return len(self._threads)

    def submit(self, job: Callable[..., Any], *args: Any, priority: int = 0) -> Future:
        future: Future = Future()
        self._jobs.put((priority, next(self._order), (future, job, args)))
        return future

    def close(self, wait: bool = True) -> None:
        """End the threads after the jobs that wait (`wait`: and wait for them to end)."""
        for _ in self._threads:  # after every job already queued
            self._jobs.put((float("inf"), next(self._order), None))
        for t in self._threads if wait else ():
            t.join()

    def _run(self) -> None:
        _work(lambda: self._jobs.get()[2])


def _work(take: Callable[[], Any]) -> None:
    """Run the (future, job, args) items `take` gives until it gives None, each job's result
    or exception into its future; then release this thread's MLX state."""
    try:
        while (item := take()) is not None:
            future, job, args = item
            item = None
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job(*args))
                except BaseException as e:  # noqa: BLE001 - the future hands it on
                    future.set_exception(e)
            # a done job's references go now, not when the next job comes: an idle reader
            # thread would otherwise keep a model it last read for (and its slots) alive
            future = job = args = None
    finally:
        release()
