"""OpenAI's API: /v1/chat/completions, /v1/completions and /v1/models.

Streamed replies are server-sent events of `chat.completion.chunk` objects ending in
`data: [DONE]`; with `stream_options.include_usage` a last chunk carries the usage. Every reply
carries llama.cpp's `timings` (the last chunk of a stream, the one that says why it ended; with
`n` choices, the first choice's).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ..generation.sampling import requested
from ..generation.stats import Chunk, Stats
from ..text.tool_formats import ToolCallReply
from .constraints import AUTO, ToolChoice, constraints, gbnf, refuse_unsupported
from .metrics import timings
from .schemas import (
    STREAMS,
    ChatRequest,
    CompletionRequest,
    NamedTool,
    OpenAIError,
    Sampling,
    error_responses,
)
from .service import APIError, Service, collect_choices, service_of, serving

router = APIRouter(prefix="/v1", responses=error_responses(OpenAIError))


def _common(service: Service, body: Sampling, max_tokens: int | None) -> dict[str, Any]:
    """Sampling settings from a request (what it leaves out: the server's defaults)."""
    refuse_unsupported(body.unsupported())
    service.check_model(body.model)
    try:
        stops = body.stops()
    except ValueError as e:
        raise APIError(400, str(e), param="stop") from None
    params = service.sampling(**{**requested("openai", body), "max_tokens": max_tokens})
    return {"params": params, "stop": stops, "n": body.n}  # n choices share one prefill


def _usage(prompt: int, *done: Stats) -> dict[str, Any]:
    completion = sum(d.generation_tokens for d in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": done[0].cached_tokens}}


def _token_text(service: Service, token: int) -> str:
    return service.tokenizer.decode([token])


def _chat_logprob(service: Service, chunk: Chunk) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(service, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(chunk.token, chunk.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in chunk.top_logprobs or []]}


def _output_grammar(service: Service, body: Sampling) -> str | None:
    """The grammar the reply's text follows: llama.cpp's `grammar` (GBNF) or `json_schema`,
    or the chat's `response_format` (None: free text)."""
    given = [f for f in ("grammar", "json_schema") if getattr(body, f) is not None]
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type != "text":
        given.append("response_format")
    if len(given) > 1:
        raise APIError(400, f"{given[1]}: give one of {', '.join(given)}", param=given[1])
    if body.grammar is not None:
        return gbnf(service, body.grammar)
    if body.json_schema is not None:
        return service.grammar(body.json_schema, param="json_schema")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return service.grammar(fmt.object_schema)
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema",
                       param="response_format")
    return service.grammar(fmt.json_schema.json_schema)


def _tool_choice(body: ChatRequest) -> ToolChoice:
    choice = body.tool_choice
    if isinstance(choice, NamedTool):  # OpenAI's "forced function": exactly one call
        return ToolChoice("required", choice.function.name, parallel=False)
    return ToolChoice(choice or "auto", parallel=body.parallel_tool_calls)


def constrained(service: Service, settings: dict[str, Any], body: Sampling,
                tools: list[dict[str, Any]] | None = None,
                choice: ToolChoice = AUTO) -> dict[str, Any]:
    """`settings` with the request's grammar and logit biases."""
    c = constraints(service, tools, choice, _output_grammar(service, body), body.logit_bias)
    return {**settings, "grammar": c.grammar,
            "params": replace(settings["params"], logit_bias=c.logit_bias)}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


@router.post("/chat/completions", responses={200: {"content": STREAMS}})
async def chat_completions(body: ChatRequest, request: Request):
    service = await serving(request, body.model)
    settings = _common(service, body, body.max_completion_tokens or body.max_tokens)
    choice = _tool_choice(body)
    tools = [t.model_dump() for t in body.tools or []] if choice.mode != "none" else None
    messages = [m.model_dump(exclude_none=True) | {"content": m.text()} for m in body.messages]
    ids = service.chat_ids(messages, tools)
    settings = constrained(service, settings, body, tools, choice)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    events = service.run(ids, is_disconnected=request.is_disconnected,
                         logprobs=logprobs, **settings)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": reply_id, "created": created, "model": service.model_id}
    tool_calls = ToolCallReply(service.tokenizer, tools)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = await _first_event(events)  # errors before streaming starts: a plain status
        return EventSourceResponse(_chat_stream(service, first, events, head, len(ids),
                                                include_usage, tool_calls, body.n),
                                   ping=15, send_timeout=30)
    replies = await collect_choices(events, body.n)
    if any(done is None for *_, done in replies):  # the client left
        return None
    choices = [_chat_choice(service, i, text, chunks, done, tool_calls, logprobs)
               for i, (text, chunks, done) in enumerate(replies)]
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": _usage(len(ids), *(done for *_, done in replies)),
            "timings": timings(replies[0][2])}


def _chat_choice(service: Service, index: int, text: str, chunks: list[Chunk], done: Stats,
                 tool_calls: ToolCallReply, logprobs: int | None) -> dict[str, Any]:
    tokens = [c.token for c in chunks]
    content_logprobs = [_chat_logprob(service, c) for c in chunks] if logprobs is not None \
        else []
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = _finish(done.finish_reason)
    calls = tool_calls.calls(tokens[0] if tokens else None, text)
    if calls:
        message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, \
            "tool_calls"
    return {"index": index, "message": message, "finish_reason": finish,
            "logprobs": {"content": content_logprobs} if logprobs is not None else None}


async def _first_event(events: AsyncIterator) -> Any:
    """The job's first event, waited for before a stream's headers go out, so that a failure
    to start (a full queue) is still an HTTP status."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _chat_stream(service: Service, first: Any, events: AsyncIterator, head: dict,
                       prompt: int, include_usage: bool, tool_calls: ToolCallReply,
                       n: int = 1) -> AsyncIterator[dict[str, str]]:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              timings: dict[str, Any] | None = None, **extra: Any) -> dict[str, str]:
        data = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, **extra}]}
        if include_usage:
            data["usage"] = None
        if timings is not None:
            data["timings"] = timings
        return {"data": json.dumps(data)}

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    held: list[list[str] | None] = [None] * n  # a tool call's text, held back until whole
    first_token: list[int | None] = [None] * n
    done: list[Stats | None] = [None] * n
    try:
        event = first
        while event is not None:
            i = event.index
            if isinstance(event, Stats):
                done[i] = event
                for piece in _chat_end(i, event, first_token[i], held[i], tool_calls, chunk):
                    yield piece
                if all(d is not None for d in done):
                    break
            elif event.token is not None and first_token[i] is None:
                first_token[i] = event.token
                held[i] = [] if tool_calls.starts(event.token) else None
            if isinstance(event, Chunk):
                if held[i] is not None:
                    held[i].append(event.text)
                elif event.text or event.logprob is not None:
                    extra = ({"logprobs": {"content": [_chat_logprob(service, event)]}}
                             if event.logprob is not None else {})
                    yield chunk(i, {"content": event.text}, **extra)
            event = await anext(events, None)
    except APIError as e:  # after the headers: the error goes into the stream
        yield {"data": json.dumps({"error": {"message": e.message, "type": e.type}})}
        return
    finally:
        await events.aclose()  # a client that left cancels the job now
    if any(d is None for d in done):
        return
    if include_usage:
        data = {**head, "object": "chat.completion.chunk", "choices": [],
                "usage": _usage(prompt, *done), "timings": timings(done[0])}
        yield {"data": json.dumps(data)}
    yield {"data": "[DONE]"}


def _chat_end(index: int, done: Stats, first_token: int | None, held: list[str] | None,
              tool_calls: ToolCallReply, chunk: Any) -> list[dict[str, str]]:
    """A streamed choice's last chunks: its tool calls (or the text held back), its finish."""
    out = []
    finish = _finish(done.finish_reason)
    calls = tool_calls.calls(first_token, "".join(held or []))
    if calls:
        out.append(chunk(index, {"tool_calls": [{"index": i, **c}
                                                 for i, c in enumerate(calls)]}))
        finish = "tool_calls"
    elif held:
        out.append(chunk(index, {"content": "".join(held)}))
    out.append(chunk(index, {}, finish, timings=timings(done)))
    return out


def _completion_logprobs(service: Service, chunks: list[Chunk], start: int) -> dict[str, Any]:
    tokens, offsets, at = [], [], start
    for c in chunks:
        tokens.append(_token_text(service, c.token))
        offsets.append(at)
        at += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [c.logprob for c in chunks],
            "top_logprobs": [{_token_text(service, t): lp for t, lp in c.top_logprobs or []}
                             for c in chunks],
            "text_offset": offsets}


@router.post("/completions", responses={200: {"content": STREAMS}})
async def completions(body: CompletionRequest, request: Request):
    service = await serving(request, body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: one prompt per request", param="prompt")
        prompt = prompt[0]
    settings = _common(service, body, body.max_tokens or 16)  # OpenAI's default length
    ids = service.text_ids(prompt)
    settings = constrained(service, settings, body)
    events = service.run(ids, is_disconnected=request.is_disconnected,
                         logprobs=body.logprobs, **settings)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.model_id, "object": "text_completion"}
    echo = (prompt if isinstance(prompt, str) else service.tokenizer.decode(ids)) \
        if body.echo else ""
    if body.stream:
        first = await _first_event(events)
        return EventSourceResponse(_completion_stream(first, events, head, echo, len(ids),
                                                      body),
                                   ping=15, send_timeout=30)
    replies = await collect_choices(events, body.n)
    if any(done is None for *_, done in replies):  # the client left
        return None
    choices = [{"index": i, "text": echo + text,
                "logprobs": (_completion_logprobs(service, chunks, len(echo))
                             if body.logprobs is not None else None),
                "finish_reason": _finish(done.finish_reason)}
               for i, (text, chunks, done) in enumerate(replies)]
    return {**head, "choices": choices,
            "usage": _usage(len(ids), *(done for *_, done in replies)),
            "timings": timings(replies[0][2])}


async def _completion_stream(first: Any, events: AsyncIterator, head: dict, echo: str,
                             prompt: int, body: CompletionRequest
                             ) -> AsyncIterator[dict[str, str]]:
    def piece(index: int, text: str, finish: str | None = None,
              **extra: Any) -> dict[str, str]:
        return {"data": json.dumps({**head, "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
            **extra})}

    if echo:
        for index in range(body.n):
            yield piece(index, echo)
    done: list[Stats | None] = [None] * body.n
    event = first
    try:
        while event is not None:
            if isinstance(event, Stats):
                done[event.index] = event
                yield piece(event.index, "", _finish(event.finish_reason),
                            timings=timings(event))
                if all(d is not None for d in done):
                    break
            elif event.text:
                yield piece(event.index, event.text)
            event = await anext(events, None)
    except APIError as e:
        yield {"data": json.dumps({"error": {"message": e.message, "type": e.type}})}
        return
    finally:
        await events.aclose()
    if any(d is None for d in done):
        return
    if body.stream_options and body.stream_options.include_usage:
        yield {"data": json.dumps({**head, "choices": [], "usage": _usage(prompt, *done),
                                   "timings": timings(done[0])})}
    yield {"data": "[DONE]"}


def _model(name: str, created: int, context: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlx-mixtral",
            "context_length": context}


def _listed(request: Request) -> list[dict[str, Any]]:
    """Every model the server answers for, loaded or not."""
    models = getattr(request.app.state, "models", None)
    if models is None:
        service = service_of(request)
        return [_model(service.model_id, service.created, service.context)]
    return [_model(e.name, e.created, e.summary.context) for e in models.entries.values()]


@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": _listed(request)}


@router.get("/models/{model_id:path}")
async def model(model_id: str, request: Request):
    for entry in _listed(request):
        if model_id in (entry["id"], f"{entry['id']}:latest"):
            return entry
    models = getattr(request.app.state, "models", None)
    if models is not None:
        models.entry(model_id)  # (raises the 404 that names them all)
    service_of(request).check_model(model_id)  # (raises the one-model server's 404)
