"""The one thread every engine call runs on, and the buffer its events come back through.

MLX arrays belong to the thread whose stream made them, so loading and generation all run on
this thread. Events wait in a locked buffer that the UI empties on a timer, so a fast model
cannot flood the UI.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import MlxMixtralError
from ..threads import MlxThread
from .conversation import Turn
from .engine import Engine, EngineInfo, Event, Prompt, Ready


class EngineWorker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pool = MlxThread("mlx")
        self.stopping = threading.Event()  # Esc: the reply stops at its next token
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._prefill_epoch = 0  # moved on when a background prefill lost its chat

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        self.pool.submit(job, *args)

    def emit(self, event: Event) -> None:  # worker thread
        with self._lock:
            self._events.append(event)

    def take(self) -> list[Event]:  # UI thread
        with self._lock:
            events, self._events = self._events, []
        return events

    def load(self, progress: Callable[[float], None], loaded: Callable[[EngineInfo], None],
             failed: Callable[[str], None], name: str | None = None) -> None:
        """Load the model (`name`: another one, the loaded one dropped first); the callbacks
        run on the worker."""
        if name is not None:
            self.submit(self.engine.select, name)

        def run() -> None:
            try:
                info = self.engine.load(progress)
            except Exception as e:  # noqa: BLE001 - shown in the app, never a traceback
                failed(str(e) if isinstance(e, MlxMixtralError) else f"{type(e).__name__}: {e}")
                return
            loaded(info)

        self.submit(run)

    def reply(self, turn: Turn) -> None:
        self.stopping.clear()
        self.submit(turn.run, self.engine, self.emit, self.stopping.is_set)

    def prefill(self, prompt: Prompt) -> None:
        """Read an opened chat into the cache now, while the user reads and types, so that
        its next reply does not wait for it. Another chat opened meanwhile stops it."""
        self.cancel_prefill()
        epoch = self._prefill_epoch

        def run() -> None:
            try:
                context = self.engine.prefill(prompt, self.emit,
                                              lambda: self._prefill_epoch != epoch)
            except Exception:  # noqa: BLE001 - the next reply reads whatever is missing
                return
            if self._prefill_epoch == epoch:
                self.emit(Ready(context))

        self.submit(run)

    def forget(self, key: str) -> None:
        """A chat was deleted: after whatever the worker is doing for it (a prefill may be
        saving its cache), the engine drops what it keeps of it."""
        self.cancel_prefill()
        forget = getattr(self.engine, "forget", None)  # (a test's engine may keep nothing)
        if forget is not None:
            self.submit(forget, key)

    def cancel_prefill(self) -> None:
        self._prefill_epoch += 1

    def close(self) -> None:
        self.stopping.set()
        self.pool.close(cancel=True)
