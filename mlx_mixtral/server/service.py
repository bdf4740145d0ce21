"""What both APIs need from the loaded model: prompts from requests, sampling settings, and a
job on the worker seen as an async stream of events.

Errors are `APIError`s, which carry their HTTP status; each API renders them its own way
(OpenAI's error object, or Ollama's {"error": ...}).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..catalog.summary import ModelSummary, summarize_args
from ..errors import MlxMixtralError
from ..generation.sampling import SamplingParams
from ..generation.stats import Chunk, Stats
from ..text.tool_formats import cannot_call_tools, tool_format, tool_prompt_ids
from .metrics import ServerMetrics, pager_counts, pool_counts
from .worker import LOST, STOPPING, Job, QueueFull, Worker

POLL_SECONDS = 0.5  # how often a waiting request checks that its client is still there


def service_of(request: Any) -> Service:
    """The server's first model's service (kept on the app's state): what /health and the
    model lists start from."""
    return request.app.state.service


async def serving(request: Any, name: str | None, keep_alive: Any = "default") -> Service:
    """The service of the model a request names (404 if the server has no such model), loaded
    first if the server keeps several and it is not loaded (`server/models.py`)."""
    models = getattr(request.app.state, "models", None)
    if models is None:
        service = service_of(request)
        service.check_model(name or "")
        return service
    return await models.get(name, keep_alive)


async def collect(events: AsyncIterator[Chunk | Stats]
                  ) -> tuple[str, list[Chunk], Stats | None]:
    """A whole reply: its text, its token chunks, and its end (None: the client left)."""
    return (await collect_choices(events, 1))[0]


async def collect_choices(events: AsyncIterator[Chunk | Stats], n: int
                          ) -> list[tuple[str, list[Chunk], Stats | None]]:
    """The `n` choices of a reply, each as `collect` gives it."""
    texts, chunks, done = [""] * n, [[] for _ in range(n)], [None] * n
    async for event in events:
        if isinstance(event, Stats):
            done[event.index] = event
        else:
            texts[event.index] += event.text
            if event.token is not None:
                chunks[event.index].append(event)
    return list(zip(texts, chunks, done, strict=True))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_overloaded"}.get(
                    self.status, "invalid_request_error" if self.status < 500 else "server_error")


@dataclass
class Service:
    model: Any
    tokenizer: Any
    model_id: str
    worker: Worker
    defaults: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))
    summary: ModelSummary | None = None  # for Ollama's model list (None: from the config)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # Requests let in (server/models.py) whose job is not on the worker yet: the model is
    # not idle while there are some.
    pending: int = 0

    def __post_init__(self) -> None:
        from ..model.limits import limits_of

        pager, pool = limits_of(self.model).expert_pager, getattr(self.worker, "pool", None)
        store = getattr(self.worker, "store", None)
        if pager is not None:
            self.metrics.watch_counts(pager_counts(pager))
        if store is not None:
            self.metrics.watch_store(store)
        elif pool is not None:
            self.metrics.watch_counts(pool_counts(pool))

    def close(self) -> None:
        """Let go of the model once its worker has stopped (the server unloaded it): its
        memory goes back even while something still refers to this service."""
        import gc

        import mlx.core as mx

        from ..model.limits import close_model

        if self.model is not None:
            close_model(self.model)
        self.model = self.tokenizer = None
        self.worker.model = self.worker.tokenizer = self.worker.scheduler = None
        gc.collect()
        mx.clear_cache()

    def described(self) -> ModelSummary:
        """The model as Ollama's /api/tags and /api/show describe it."""
        return self.summary or summarize_args(self.model.args)

    # ---- requests into prompts ------------------------------------------------------------

    def check_model(self, name: str) -> None:
        """Requests name the served model (Ollama clients add a ":latest" tag)."""
        if name not in (self.model_id, f"{self.model_id}:latest"):
            raise APIError(404, f"the model {name!r} does not exist; this server has "
                           f"{self.model_id!r}", param="model", code="model_not_found")

    @property
    def context(self) -> int:
        from ..generation.stream import context_length

        return context_length(self.model)

    def check_length(self, ids: list[int]) -> None:
        """The generation's own prompt check (empty, over the context, outside the
        vocabulary), answered as a 400 before the request queues."""
        from ..generation.stream import check_prompt

        try:
            check_prompt(self.model, ids)
        except MlxMixtralError as e:
            long = len(ids) >= self.context
            raise APIError(400, str(e), param="messages",
                           code="context_length_exceeded" if long else None) from None

    @property
    def calls_tools(self) -> bool:
        """Whether the model can call tools: Mistral v3's format with its tool tokens, or a
        chat template that takes tools and writes calls in a format we read."""
        return tool_format(self.tokenizer) is not None

    def chat_ids(self, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt for a chat. Tools, tool calls and tool results need the Mistral v3
        format or a chat template that takes tools (`text/tool_formats.py`)."""
        uses_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls")
                                        for m in messages)
        messages = [{**m, "role": "system"} if m.get("role") == "developer" else m
                    for m in messages]
        try:
            if uses_tools:
                if self.calls_tools:
                    ids = tool_prompt_ids(self.tokenizer, messages, tools)
                else:
                    raise APIError(400, cannot_call_tools(self.model_id), param="tools")
            else:
                plain = [{"role": m["role"], "content": m.get("content") or ""}
                         for m in messages]
                ids = self.tokenizer.apply_chat_template(plain)
        except MlxMixtralError as e:
            raise APIError(400, str(e), param="messages") from None
        self.check_length(ids)
        return ids

    def text_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
        self.check_length(ids)
        return ids

    def sampling(self, **wanted: Any) -> SamplingParams:
        try:
            return SamplingParams.from_kwargs(self.defaults, **wanted)
        except MlxMixtralError as e:
            raise APIError(400, str(e), param=(e.params or (None,))[0]) from None

    # ---- running ------------------------------------------------------------------------

    async def run(self, ids: list[int], params: SamplingParams,
                  is_disconnected: Callable[[], Awaitable[bool]], stop: list[str] | None = None,
                  logprobs: int | None = None, grammar: str | None = None,
                  n: int = 1) -> AsyncIterator[Chunk | Stats]:
        """The job's chunks, then its end (`Stats`), for each of its `n` choices (`index`). A
        client that goes away cancels it; a failure becomes an APIError (500 without a
        traceback: the log has it)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: Chunk | Stats) -> None:  # on the worker's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: the server stopped, nobody listens
                job.cancelled.set()

        job = Job(ids, params, self.metrics.watch(emit), stop=stop or [], logprobs=logprobs,
                  grammar=grammar, n=n)
        ended = 0
        try:
            self.worker.submit(job)
        except QueueFull:
            self.pending = max(0, self.pending - 1)
            raise APIError(503, f"the server is busy: {self.worker.max_queue} requests are "
                           "queued; try again shortly") from None
        self.pending = max(0, self.pending - 1)  # (the worker counts it now)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    continue
                if isinstance(event, Stats) and event.error is not None:
                    raise APIError(503 if event.error in (LOST, STOPPING) else 500, event.error)
                yield event
                if isinstance(event, Stats):
                    ended += 1
                    if ended == n:
                        return
        finally:
            job.cancelled.set()  # stops the job if it is still queued or running

    def grammar(self, schema: dict[str, Any] | None, param: str = "response_format") -> str:
        from ..generation.grammar import json_grammar

        try:  # a schema llguidance refuses is the client's 400, not the worker's failure
            return json_grammar(schema, self.tokenizer, self.model.args.vocab_size)
        except MlxMixtralError as e:
            raise APIError(400, str(e), param=param) from None
