"""The HTTP server process: uvicorn, stopped by SIGINT or SIGTERM without killing the process.

uvicorn raises a signal again once it has shut down, so that the default handler ends the
process; that would end it before the model's thread has finished and released MLX (an abort,
or exit -15). Here a signal stops the worker's jobs and then uvicorn, and `serve` returns.

sse-starlette would cut every open stream within half a second of the signal, often before the
halted job's last event ("the server is stopping") reached it; the streams end by themselves
instead, since the halted worker ends every job, and uvicorn's grace period bounds the wait.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

GRACE_SECONDS = 5  # open connections get this long to finish once the server stops


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_stop()  # running replies end now, and say why
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: do not wait for connections
        self.should_exit = True


def run_http(app: ASGIApp, host: str, port: int, log_level: str,
             on_stop: Callable[[], None]) -> None:
    """Serve `app` until SIGINT or SIGTERM; `on_stop` runs first when one arrives."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACE_SECONDS)
    _Server(config, on_stop).run()
