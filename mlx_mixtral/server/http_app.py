"""The ASGI application: both APIs, /health, /metrics, and what guards them.

- Bodies over `max_body` bytes get a 413 before they are read whole.
- With an API key, every path but /health needs `Authorization: Bearer KEY` (or Anthropic's
  `x-api-key: KEY`).
- CORS is off unless origins are given.
- Every error is an OpenAI error object under /v1 (Anthropic's under /v1/messages, Ollama's
  {"error": ...} under /api), with a 4xx status for the client's mistakes. Nothing answers
  with a traceback: an unexpected failure is a 500 with one line, and the log has the rest.
- Every answer is counted by path and status for /metrics (server/metrics.py).
- /health shows the kept prompts' bytes in memory (`memory.prompt_cache`, its budget and
  evictions) and the prefix store's stats (`prefix_store`: hits, tokens reused, blocks and bytes
  per tier, evictions; null under mlx.launch, where a pool keeps whole caches).
"""

from __future__ import annotations

import hmac
import logging
import resource
import sys
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from . import DEFAULT_MAX_BODY, anthropic_api, ollama_api, openai_api, responses_api
from .metrics import ServerMetrics, occupancy
from .models import Models
from .response_store import RESPONSE_STORE_BYTES, ResponseStore
from .service import APIError, Service

log = logging.getLogger("mlx_mixtral.server")


@dataclass
class Guards:
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    cors_origins: tuple[str, ...] = ()


def error_body(path: str, status: int, message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
    if path.startswith("/api/"):
        return {"error": message}
    if path.startswith(anthropic_api.PREFIX):
        return anthropic_api.error_body(status, message)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _send_error(path: str, error: APIError,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, error.status, error.message, error.type, error.param,
                                   error.code), status_code=error.status, headers=headers)


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body")


class HttpMiddleware:
    """An ASGI middleware that sees HTTP requests (`http`) and passes anything else through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class BodyLimit(HttpMiddleware):
    """413 for a body over the limit: by its Content-Length, or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = APIError(413, f"the request body is over {self.limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(scope["path"], too_big)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return message

        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await _send_error(scope["path"], too_big)(scope, receive, send)


class _TooBig(Exception):  # noqa: N818 - a signal inside BodyLimit
    pass


class JsonBodies(HttpMiddleware):
    """Ollama's clients (and curl -d) may send JSON without saying so: under /api/ a POST body
    is read as JSON whatever its content type."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/api/"):
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class ApiKey(HttpMiddleware):
    """`Authorization: Bearer KEY` or `x-api-key: KEY` on every path but /health (compared in
    constant time)."""

    OPEN = {"/health"}

    def __init__(self, app: ASGIApp, key: str) -> None:
        super().__init__(app)
        self.key = key.encode()

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        bearer = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        if not bearer and not hmac.compare_digest(headers.get(b"x-api-key", b""), self.key):
            error = APIError(401, "a valid API key is needed: send Authorization: Bearer KEY "
                             "(or x-api-key: KEY)", code="invalid_api_key")
            return await _send_error(scope["path"], error)(scope, receive, send)
        await self.app(scope, receive, send)


class CountAnswers(HttpMiddleware):
    """Each answer's path and status into the metrics (the guards' 401 and 413 too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500  # what an exception that escapes everything becomes

        async def seen(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, seen)
        finally:
            self.metrics.answered(scope["path"], status)


def resident_bytes() -> int:
    """The process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def create_app(service: Service, guards: Guards | None = None,
               response_store_bytes: int = RESPONSE_STORE_BYTES,
               models: Models | None = None) -> FastAPI:
    """The app serving `service`'s model (and, with `models`, the others it names)."""
    guards = guards or Guards()
    app = FastAPI(title="mlx-mixtral", version=__version__,
                  description="OpenAI-, Anthropic- and Ollama-compatible API for a local "
                  "Mistral model")
    app.state.service = service
    if models is not None:
        app.state.models = models
    app.state.responses = ResponseStore(response_store_bytes)
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(ollama_api.router)

    @app.get("/health")
    async def health() -> dict:
        import mlx.core as mx

        worker = service.worker
        running, waiting, capacity = occupancy(worker)
        return {"status": "ok", "model": service.model_id,
                "queue": {"running": running, "waiting": waiting, "capacity": capacity,
                          "max": worker.max_queue, "served": worker.served,
                          "forward_passes": worker.forward_calls},
                "memory": {"mlx_active": mx.get_active_memory(),
                           "mlx_cache": mx.get_cache_memory(),
                           "mlx_peak": mx.get_peak_memory(),
                           **worker.kept(),
                           "resident": resident_bytes()},
                "prefix_store": None if worker.store is None else worker.store.stats(),
                **({} if models is None else {"models": [
                    {"name": e.name, "loaded": e.service is not None,
                     "loading": e.loading is not None, "pinned": e.pinned}
                    for e in models.entries.values()]})}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.exposition(service.worker),
                        media_type=CONTENT_TYPE_LATEST)

    service.metrics.paths = {"/health", "/metrics", *(
        r.path for router in (openai_api.router, responses_api.router, anthropic_api.router,
                              ollama_api.router) for r in router.routes)}

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _send_error(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = _field(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where}: {first.get('msg', 'invalid')}" if where else \
                first.get("msg", "invalid request")
        return _send_error(request.url.path, APIError(400, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _send_error(request.url.path, APIError(error.status_code, str(error.detail)),
                           error.headers)  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _send_error(request.url.path, APIError(500, f"internal error: "
                                                      f"{type(error).__name__}"))

    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, limit=guards.max_body)
    if guards.api_key:
        app.add_middleware(ApiKey, key=guards.api_key)
    if guards.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(guards.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(CountAnswers, metrics=service.metrics)  # outermost: sees every answer
    return app

