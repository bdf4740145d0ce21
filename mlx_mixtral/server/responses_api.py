"""OpenAI's Responses API: POST /v1/responses (streamed as its typed events), GET and DELETE
/v1/responses/{id}.

Input items become the chat messages the other APIs build prompts from: messages, function
calls (an assistant's tool calls) and their outputs (tool messages). A response is kept (unless
`store` is false) in the app's `ResponseStore` with the conversation that led to it, so
`previous_response_id` continues it; the KV cache pool then finds the earlier turn's tokens.
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

from ..text.tool_formats import ToolCallReply
from .constraints import ToolChoice, constraints, refuse_unsupported
from .reply_parts import Ending, ending, reply_parts, started
from .response_store import ResponseStore
from .schemas import STREAMS, OpenAIError, ResponsesItem, ResponsesRequest, error_responses
from .service import APIError, Service, collect, serving

router = APIRouter(prefix="/v1", responses=error_responses(OpenAIError))


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


def _text(content: str | list | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content)


def _messages(items: str | list[ResponsesItem]) -> list[dict[str, Any]]:
    """Input items as chat messages; consecutive function calls are one assistant turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if item.type == "message":
            if item.role is None:
                raise APIError(400, "input: a message item needs a role", param="input")
            out.append({"role": item.role, "content": _text(item.content)})
        elif item.type == "function_call":
            if not (item.call_id and item.name):
                raise APIError(400, "input: a function_call needs call_id and name",
                               param="input")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            if not item.call_id:
                raise APIError(400, "input: a function_call_output needs call_id",
                               param="input")
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": item.output or ""})
    return out


def _tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, ToolChoice]:
    c = body.tool_choice
    # A named function is OpenAI's "forced function": exactly one call.
    choice = ToolChoice("required", c.name, parallel=False) if c is not None \
        and not isinstance(c, str) else ToolChoice(c or "auto", parallel=body.parallel_tool_calls)
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}}
             for t in body.tools or []]
    return (tools or None) if choice.mode != "none" else None, choice


def _output_grammar(service: Service, body: ResponsesRequest) -> str | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "text.format: json_schema needs a schema", param="text.format")
    return service.grammar(fmt.json_schema, param="text.format")


def _output(end: Ending, message_id: str) -> list[dict[str, Any]]:
    if end.calls:
        return [{"type": "function_call", "id": f"fc_{c['id']}", "call_id": c["id"],
                 "name": c["function"]["name"], "arguments": c["function"]["arguments"],
                 "status": "completed"} for c in end.calls]
    return [{"type": "message", "id": message_id, "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": end.text, "annotations": []}]}]


def _reply_messages(end: Ending) -> list[dict[str, Any]]:
    """The reply as chat messages, for the next turn's conversation."""
    if end.calls:
        return [{"role": "assistant", "content": "", "tool_calls": end.calls}]
    return [{"role": "assistant", "content": end.text}]


class _Turn:
    """One request's response object, as it starts and as it ends."""

    def __init__(self, service: Service, body: ResponsesRequest, tools: list | None,
                 choice: ToolChoice) -> None:
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        named = {"type": "function", "name": choice.name}
        self.head = {
            "id": self.id, "object": "response", "created_at": int(time.time()),
            "model": service.model_id, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "temperature": body.temperature, "top_p": body.top_p, "store": body.store,
            "tool_choice": named if choice.name else choice.mode,
            "tools": [{"type": "function", **t["function"], "strict": True}
                      for t in tools or []],
            "text": body.text.model_dump(by_alias=True) if body.text else
            {"format": {"type": "text"}},
            "metadata": body.metadata or {}, "truncation": "disabled", "error": None,
            "incomplete_details": None, "user": body.user}

    def started(self) -> dict[str, Any]:
        return {**self.head, "status": "in_progress", "output": [], "usage": None}

    def finished(self, end: Ending, prompt: int) -> dict[str, Any]:
        length = end.done.finish_reason == "length" and not end.calls
        generated = end.done.generation_tokens
        return {**self.head, "status": "incomplete" if length else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if length else None,
                "output": _output(end, self.message_id),
                "usage": {"input_tokens": prompt,
                          "input_tokens_details": {"cached_tokens": end.done.cached_tokens},
                          "output_tokens": generated,
                          "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": prompt + generated}}


@router.post("/responses", responses={200: {"content": STREAMS}})
async def create(body: ResponsesRequest, request: Request):
    service = await serving(request, body.model)
    refuse_unsupported(body.unsupported())
    service.check_model(body.model)
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = _store(request).get(body.previous_response_id)
        if stored is None:
            raise APIError(404, f"previous_response_id: no stored response "
                           f"{body.previous_response_id!r} (unknown, not stored, or evicted "
                           "from the server's response store)", param="previous_response_id",
                           code="previous_response_not_found")
        earlier = stored.conversation
    tools, choice = _tools(body)
    conversation = earlier + _messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    ids = service.chat_ids(system + conversation, tools)
    params = service.sampling(temperature=body.temperature, top_p=body.top_p,
                              max_tokens=body.max_output_tokens, seed=body.seed)
    c = constraints(service, tools, choice, _output_grammar(service, body))
    events = service.run(ids, replace(params, logit_bias=c.logit_bias),
                         is_disconnected=request.is_disconnected, grammar=c.grammar)
    turn = _Turn(service, body, tools, choice)
    tool_calls = ToolCallReply(service.tokenizer, tools)

    def finish(end: Ending) -> dict[str, Any]:
        response = turn.finished(end, len(ids))
        if body.store:
            _store(request).put(response, conversation + _reply_messages(end))
        return response

    if body.stream:
        parts = reply_parts(await started(events), tool_calls)
        return EventSourceResponse(_stream(turn, parts, finish),
                                   ping=15, send_timeout=30)
    text, chunks, done = await collect(events)
    if done is None:
        return None
    return finish(ending(done, chunks[0].token if chunks else None, text, tool_calls))


@router.api_route("/responses/{response_id}", methods=["GET", "DELETE"])
async def stored(response_id: str, request: Request):
    """GET returns a stored response, DELETE forgets it (one route: one Allow header)."""
    store = _store(request)
    found = store.get(response_id)
    if found is None:
        raise APIError(404, f"no stored response {response_id!r}", param="response_id")
    if request.method == "GET":
        return found.response
    store.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _stream(turn: _Turn, parts: AsyncIterator[str | Ending], finish: Any
                  ) -> AsyncIterator[dict[str, str]]:
    number = 0

    def event(kind: str, **data: Any) -> dict[str, str]:
        nonlocal number
        number += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": number,
                                                   **data})}

    where = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}

    def opening() -> list[dict[str, str]]:
        item = {"type": "message", "id": turn.message_id, "status": "in_progress",
                "role": "assistant", "content": []}
        return [event("response.output_item.added", output_index=0, item=item),
                event("response.content_part.added", **where, part=empty_part)]

    started = turn.started()
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    opened, text = False, ""
    try:
        async for part in parts:
            if isinstance(part, str):
                if not opened:
                    for e in opening():
                        yield e
                    opened = True
                text += part
                yield event("response.output_text.delta", **where, delta=part, logprobs=[])
                continue
            response = finish(part)
            if not part.calls:
                if not opened:
                    for e in opening():
                        yield e
                if part.held:
                    yield event("response.output_text.delta", **where, delta=part.held,
                                logprobs=[])
                full = {**empty_part, "text": text + part.held}
                yield event("response.output_text.done", **where, text=full["text"],
                            logprobs=[])
                yield event("response.content_part.done", **where, part=full)
            for i, item in enumerate(response["output"]):
                if item["type"] == "function_call":
                    yield event("response.output_item.added", output_index=i,
                                item={**item, "arguments": "", "status": "in_progress"})
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=i, delta=item["arguments"])
                    yield event("response.function_call_arguments.done", item_id=item["id"],
                                output_index=i, arguments=item["arguments"])
                yield event("response.output_item.done", output_index=i, item=item)
            done = "response.incomplete" if response["status"] == "incomplete" \
                else "response.completed"
            yield event(done, response=response)
    except APIError as e:
        yield event("error", code=e.code, message=e.message, param=e.param)
    finally:
        await parts.aclose()
