"""The models one server answers for, loaded when a request names them.

Each model has a `Service` of its own (its worker thread, its queue, its caches). A request for
a model that is not loaded starts its load on a thread of its own, so requests to the loaded
models go on meanwhile; requests for the loading model wait for it. At most `max_models` are
loaded: to load another, the least recently used idle one that is not pinned is unloaded (when
every one is busy, the request gets a 503). A model that is not pinned also unloads once it has
been idle for its keep-alive (Ollama's `keep_alive`, or the server's `--keep-alive`; 0: as soon
as it is idle).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..catalog.summary import ModelSummary
from .service import APIError, Service

log = logging.getLogger("mlx_mixtral.server")

# A request let in counts as pending until its job reaches the worker; one that never gets
# there (refused as a bad request) stops counting after this long.
PENDING_SECONDS = 10.0
REAP_SECONDS = 0.5  # how often idle models are looked at


@dataclass
class Entry:
    """One model the server may serve, loaded or not."""

    name: str
    load: Callable[[], Service]  # blocking: loads, and gives the model's service
    summary: ModelSummary  # what the model lists say before it is loaded
    pinned: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    service: Service | None = None
    loading: threading.Event | None = None  # set when a load in progress ends
    error: Exception | None = None  # the last load's failure
    used: float = 0.0  # monotonic time of the last request let in
    keep_alive: float | None = None  # seconds idle before unloading (None: forever)
    loaded_at: float = field(default_factory=time.time)

    def names(self) -> tuple[str, str]:
        return self.name, f"{self.name}:latest"  # (Ollama's clients add the tag)

    @property
    def expires(self) -> float | None:
        """Monotonic time after which it unloads once idle (None: never, as for a pinned
        model, whatever keep-alive a request asked)."""
        if self.keep_alive is None or self.pinned:
            return None
        return self.used + self.keep_alive


class Models:
    def __init__(self, entries: list[Entry], max_models: int = 1,
                 keep_alive: float | None = None) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.entries = {e.name: e for e in entries}
        self.max_models, self.keep_alive = max_models, keep_alive
        self.lock = threading.Lock()
        self.unloaded = 0
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="model-reaper",
                                        daemon=True)
        self._reaper.start()

    # ---- lookups ----------------------------------------------------------------------------

    def entry(self, name: str | None) -> Entry:
        for entry in self.entries.values():
            if name in entry.names():
                return entry
        known = ", ".join(repr(n) for n in self.entries)
        raise APIError(404, f"the model {name!r} does not exist; this server has {known}",
                       param="model", code="model_not_found")

    def adopt(self, name: str, service: Service) -> None:
        """`name`'s model is loaded already (the server's first, loaded at start)."""
        with self.lock:
            entry = self.entries[name]
            entry.service, entry.used = service, time.monotonic()
            entry.keep_alive = self.keep_alive

    @property
    def loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.service is not None]

    async def get(self, name: str | None, keep_alive: float | None | str = "default"
                  ) -> Service:
        """The service of the model `name`, loaded first if it is not (waiting for a load in
        progress). `keep_alive`: seconds it stays loaded once idle after this request (None:
        forever; "default": the server's)."""
        entry = self.entry(name)
        while True:
            with self.lock:
                if entry.service is not None:
                    entry.used = time.monotonic()
                    entry.service.pending += 1
                    entry.keep_alive = self.keep_alive if keep_alive == "default" \
                        else keep_alive
                    return entry.service
                if entry.loading is None:
                    self._make_room(entry)
                    entry.loading, entry.error = threading.Event(), None
                    threading.Thread(target=self._load, args=(entry,), daemon=True,
                                     name=f"load-{entry.name}").start()
                loading = entry.loading
            await asyncio.to_thread(loading.wait)
            with self.lock:
                if entry.service is None and entry.error is not None:
                    raise APIError(500, f"the model {entry.name!r} could not be loaded: "
                                   f"{entry.error}")

    def _make_room(self, entry: Entry) -> None:
        """Unload the least recently used idle model if loading `entry` would exceed
        max_models (under the lock)."""
        taken = [e for e in self.entries.values()
                 if e is not entry and (e.service is not None or e.loading is not None)]
        if len(taken) < self.max_models:
            return
        idle = sorted((e for e in taken if e.service is not None and not e.pinned
                       and self._idle(e)), key=lambda e: e.used)
        if not idle:
            raise APIError(503, f"cannot load {entry.name!r}: the server keeps at most "
                           f"{self.max_models} model(s) loaded (--max-models) and none of "
                           "them is idle; try again shortly")
        self._unload(idle[0], "to make room for " + entry.name)

    def _load(self, entry: Entry) -> None:
        service: Service | None = None
        error: Exception | None = None
        try:
            service = entry.load()
        except Exception as e:  # noqa: BLE001 - told to every request waiting for it
            log.error("loading %s failed: %s", entry.name, e)
            error = e
        with self.lock:
            entry.service, entry.error = service, error
            entry.used, entry.loaded_at = time.monotonic(), time.time()
            loading, entry.loading = entry.loading, None
        if service is not None:
            log.info("loaded %s", entry.name)
        if loading is not None:
            loading.set()

    # ---- unloading --------------------------------------------------------------------------

    @staticmethod
    def _idle(entry: Entry) -> bool:
        service = entry.service
        pending = service.pending and time.monotonic() - entry.used < PENDING_SECONDS
        return not pending and service.worker.running == 0 and service.worker.waiting == 0

    def _unload(self, entry: Entry, why: str) -> None:
        """Under the lock."""
        service, entry.service = entry.service, None
        self.unloaded += 1
        log.info("unloaded %s (%s)", entry.name, why)
        service.worker.stop()
        service.close()

    def unload_now(self, name: str | None) -> None:
        """Ollama's keep_alive 0 with no prompt: unload at once (if no request is running)."""
        entry = self.entry(name)
        with self.lock:
            if entry.service is not None and self._idle(entry):
                self._unload(entry, "keep_alive 0")

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_SECONDS):
            now = time.monotonic()
            with self.lock:
                for entry in self.loaded:
                    expires = entry.expires
                    if expires is not None and now >= expires and self._idle(entry):
                        self._unload(entry, "its keep-alive ran out")

    def close(self) -> None:
        """Stop unloading (the server stops; the caller stops the workers: `services`)."""
        self._stop.set()

    def services(self) -> list[Service]:
        with self.lock:
            return [e.service for e in self.loaded]

    # ---- what /api/ps shows -----------------------------------------------------------------

    def running(self) -> list[dict]:
        out = []
        now_wall, now = time.time(), time.monotonic()
        for entry in self.loaded:
            summary = entry.service.described()
            expires = entry.expires
            at = FOREVER if expires is None else _iso(now_wall + max(0.0, expires - now))
            out.append({"name": entry.name, "model": entry.name,
                        "size": summary.memory_bytes, "size_vram": summary.memory_bytes,
                        "digest": "", "expires_at": at, "pinned": entry.pinned,
                        "details": {"format": summary.format, "family": summary.family,
                                    "parameter_size": summary.parameter_size,
                                    "quantization_level": summary.stored_as}})
        return out


FOREVER = "2318-11-26T00:00:00Z"  # what Ollama shows for a model kept loaded forever


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None | str:
    """Ollama's keep_alive: seconds (a number, or a duration such as "5m", "1h30m"); negative
    keeps the model loaded forever (None); absent: the server's own ("default")."""
    if value is None:
        return "default"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value < 0 else float(value)
    text = str(value).strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    try:
        seconds = float(body)
    except ValueError:
        parts = _DURATION.findall(body)
        if not parts or "".join(n + u for n, u in parts) != body:
            raise APIError(400, f"keep_alive: {value!r} is not a duration (e.g. 300, \"5m\", "
                           "\"1h\", -1 for ever, 0 to unload)", param="keep_alive") from None
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    return None if sign < 0 else seconds
