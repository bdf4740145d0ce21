"""Anthropic's Messages API: /v1/messages (streamed as Anthropic's server-sent events) and
/v1/messages/count_tokens, so Claude clients and agents use the model unchanged.

A conversation's blocks become the chat messages the other APIs build prompts from: `tool_use`
blocks are an assistant's tool calls, `tool_result` blocks tool messages. Errors under these
paths have Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from ..text.tool_formats import ToolCallReply
from .constraints import ToolChoice, constraints, refuse_unsupported
from .reply_parts import Ending, ending, reply_parts, started, stop_sequence
from .schemas import (
    STREAMS,
    AnthropicCount,
    AnthropicError,
    AnthropicMessage,
    AnthropicRequest,
    AnthropicText,
    AnthropicToolResult,
    AnthropicToolUse,
    error_responses,
)
from .service import APIError, Service, collect, serving

PREFIX = "/v1/messages"
router = APIRouter(prefix=PREFIX, responses=error_responses(AnthropicError))

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
          503: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = _KINDS.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _system(system: str | list[AnthropicText] | None) -> list[dict[str, Any]]:
    if not system:
        return []
    text = system if isinstance(system, str) else "\n".join(b.text for b in system)
    return [{"role": "system", "content": text}]


def _turn(message: AnthropicMessage) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results first (they answer the calls
    before them), then the text; an assistant's tool_use blocks are its tool calls."""
    blocks = [AnthropicText(type="text", text=message.content)] \
        if isinstance(message.content, str) else message.content
    text = "".join(b.text for b in blocks if isinstance(b, AnthropicText))
    if message.role == "assistant":
        calls = [{"id": b.id, "type": "function",
                  "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                 for b in blocks if isinstance(b, AnthropicToolUse)]
        return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls
                                                            else {})}]
    if any(isinstance(b, AnthropicToolUse) for b in blocks):
        raise APIError(400, "messages: tool_use blocks belong in assistant messages",
                       param="messages")
    out = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
           for b in blocks if isinstance(b, AnthropicToolResult)]
    return out + ([{"role": "user", "content": text}] if text or not out else [])


def _tools(body: AnthropicCount) -> tuple[list[dict[str, Any]] | None, ToolChoice]:
    """The tools as OpenAI function tools, and the tool choice."""
    c = body.tool_choice
    choice = ToolChoice() if c is None else ToolChoice(
        {"auto": "auto", "any": "required", "tool": "required", "none": "none"}[c.type],
        c.name if c.type == "tool" else None, not c.disable_parallel_tool_use)
    if c is not None and c.type == "tool" and not c.name:
        raise APIError(400, "tool_choice: type 'tool' needs the tool's name",
                       param="tool_choice")
    for t in body.tools or []:
        if t.type not in (None, "custom"):
            raise APIError(400, f"tools: server tools ({t.type}) are not supported",
                           param="tools")
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema}}
             for t in body.tools or []]
    return (tools or None) if choice.mode != "none" else None, choice


def _prompt(service: Service, body: AnthropicCount) -> tuple[list[int], list | None,
                                                             ToolChoice]:
    refuse_unsupported(body.unsupported())
    service.check_model(body.model)
    tools, choice = _tools(body)
    messages = _system(body.system) + [m for msg in body.messages for m in _turn(msg)]
    return service.chat_ids(messages, tools), tools, choice


def _usage(prompt: int, generated: int, cached: int) -> dict[str, Any]:
    """Anthropic counts the prompt's tokens read from the cache apart from the others."""
    return {"input_tokens": prompt - cached, "output_tokens": generated,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _content(end: Ending) -> list[dict[str, Any]]:
    if end.calls:
        return [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": json.loads(c["function"]["arguments"] or "{}")} for c in end.calls]
    return [{"type": "text", "text": end.text}]


def _stop_reason(end: Ending, stop: str | None) -> str:
    if end.calls:
        return "tool_use"
    if end.done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop is not None else "end_turn"


def _output_grammar(service: Service, body: AnthropicRequest) -> str | None:
    """Structured output (`output_config.format`, a JSON schema)."""
    config = body.output_config
    if config is not None and config.effort is not None:
        refuse_unsupported(["output_config.effort"])
    if config is None or config.format is None:
        return None
    return service.grammar(config.format.json_schema, param="output_config.format")


@router.post("/count_tokens")
async def count_tokens(body: AnthropicCount, request: Request):
    ids, _, _ = _prompt(await serving(request, body.model), body)
    return {"input_tokens": len(ids)}


@router.post("", responses={200: {"content": STREAMS}})
async def messages(body: AnthropicRequest, request: Request):
    service = await serving(request, body.model)
    ids, tools, choice = _prompt(service, body)
    stops = [s for s in body.stop_sequences or [] if s]
    params = service.sampling(temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, max_tokens=body.max_tokens, seed=body.seed)
    c = constraints(service, tools, choice, _output_grammar(service, body))
    events = service.run(ids, replace(params, logit_bias=c.logit_bias),
                         is_disconnected=request.is_disconnected, stop=stops,
                         grammar=c.grammar)
    head = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": service.model_id}
    tool_calls = ToolCallReply(service.tokenizer, tools)
    if body.stream:
        return EventSourceResponse(_stream(service, await started(events), head, len(ids),
                                           stops, tool_calls), ping=15, send_timeout=30)
    text, chunks, done = await collect(events)
    if done is None:
        return None
    end = ending(done, chunks[0].token if chunks else None, text, tool_calls)
    stop = stop_sequence(service.tokenizer, done, text, stops)
    return {**head, "content": _content(end), "stop_reason": _stop_reason(end, stop),
            "stop_sequence": stop,
            "usage": _usage(len(ids), done.generation_tokens, done.cached_tokens)}


def _event(kind: str, **data: Any) -> dict[str, str]:
    return {"event": kind, "data": json.dumps({"type": kind, **data})}


async def _stream(service: Service, events: AsyncIterator, head: dict[str, Any], prompt: int,
                  stops: list[str], tool_calls: ToolCallReply) -> AsyncIterator[dict[str, str]]:
    yield _event("message_start", message={
        **head, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": _usage(prompt, 0, 0)})
    index, open_text, text = 0, False, ""
    parts = reply_parts(events, tool_calls)
    try:
        async for part in parts:
            if isinstance(part, str):
                if not open_text:
                    yield _event("content_block_start", index=index,
                                 content_block={"type": "text", "text": ""})
                    open_text = True
                text += part
                yield _event("content_block_delta", index=index,
                             delta={"type": "text_delta", "text": part})
                continue
            if part.held or not (open_text or part.calls):  # a reply of text only, or none
                if not open_text:
                    yield _event("content_block_start", index=index,
                                 content_block={"type": "text", "text": ""})
                    open_text = True
                if part.held:
                    yield _event("content_block_delta", index=index,
                                 delta={"type": "text_delta", "text": part.held})
            if open_text:
                yield _event("content_block_stop", index=index)
                index += 1
            for block in _content(part) if part.calls else []:
                yield _event("content_block_start", index=index,
                             content_block={**block, "input": {}})
                yield _event("content_block_delta", index=index,
                             delta={"type": "input_json_delta",
                                    "partial_json": json.dumps(block["input"])})
                yield _event("content_block_stop", index=index)
                index += 1
            stop = stop_sequence(service.tokenizer, part.done, text, stops)
            yield _event("message_delta",
                         delta={"stop_reason": _stop_reason(part, stop), "stop_sequence": stop},
                         usage=_usage(prompt, part.done.generation_tokens,
                                      part.done.cached_tokens))
            yield _event("message_stop")
    except APIError as e:  # after the headers: the error goes into the stream
        yield {"event": "error", "data": json.dumps(error_body(e.status, e.message))}
    finally:
        await parts.aclose()
