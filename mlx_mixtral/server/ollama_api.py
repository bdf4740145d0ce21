"""Ollama's API: /api/chat and /api/generate (streamed as NDJSON by default), /api/tags,
/api/show and /api/version, so Ollama clients and tools set up for Ollama work unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import __version__
from ..generation.sampling import requested
from ..generation.stats import Stats
from ..text.tool_formats import ToolCallReply
from .metrics import timings
from .models import FOREVER, keep_alive_seconds
from .schemas import (
    NDJSON,
    OllamaBase,
    OllamaChatRequest,
    OllamaError,
    OllamaGenerateRequest,
    OllamaShowRequest,
    error_responses,
)
from .service import APIError, Service, collect, service_of, serving

if TYPE_CHECKING:
    from ..catalog.summary import ModelSummary

router = APIRouter(prefix="/api", responses=error_responses(OllamaError))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _settings(service: Service, body: OllamaBase) -> dict[str, Any]:
    service.check_model(body.model)
    o = body.options
    wanted: dict[str, Any] = {}
    if o is not None:
        length = None if o.num_predict is None or o.num_predict < 0 else max(o.num_predict, 1)
        wanted = {**requested("ollama", o), "max_tokens": length}
    grammar = None
    if body.format is not None:
        grammar = service.grammar(None if body.format == "json" else body.format)
    return {"params": service.sampling(**wanted), "grammar": grammar,
            "stop": [s for s in (o.stop or []) if s] if o else []}


def _final(service: Service, s: Stats, started: float) -> dict[str, Any]:
    """The end of a reply: Ollama's counts and durations are OpenAI's `timings` in ns."""
    t, ns_per_ms = timings(s), 1_000_000
    return {"model": service.model_id, "created_at": _now(), "done": True,
            "done_reason": "length" if s.finish_reason == "length" else "stop",
            "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": t["prompt_n"],
            "prompt_eval_duration": int(t["prompt_ms"] * ns_per_ms),
            "eval_count": t["predicted_n"], "eval_duration": int(t["predicted_ms"] * ns_per_ms)}


async def _respond(service: Service, events: AsyncIterator, stream: bool, piece,
                   finish, held: Callable[[int | None], bool] = lambda _: False) -> Any:
    """NDJSON lines while streaming, else one object; `piece(text)` and `finish(text, done)`
    shape them. A reply whose first token is `held` (a tool call) is not streamed: the final
    line carries it, parsed."""
    started = time.perf_counter()
    if not stream:
        text, _, done = await collect(events)
        return None if done is None else finish(text, done, started)
    first = await anext(events, None)

    async def lines() -> AsyncIterator[str]:
        text, event = "", first
        holding = held(getattr(first, "token", None))
        try:
            while event is not None:
                if isinstance(event, Stats):
                    yield json.dumps(finish(text, event, started, streamed=True)) + "\n"
                    return
                text += event.text
                if event.text and not holding:
                    yield json.dumps(piece(event.text)) + "\n"
                event = await anext(events, None)
        except APIError as e:
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            await events.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _unloaded(request: Request, body: OllamaBase) -> bool:
    """Ollama's way to unload a model: a request with nothing to say and keep_alive 0."""
    if keep_alive_seconds(body.keep_alive) != 0:
        return False
    models = getattr(request.app.state, "models", None)
    if models is None:
        service_of(request).check_model(body.model)
        return False  # one model, always loaded: nothing to unload
    models.unload_now(body.model)
    return True


@router.post("/chat", responses={200: {"content": NDJSON}})
async def chat(body: OllamaChatRequest, request: Request):
    if not body.messages and _unloaded(request, body):
        return {"model": body.model, "created_at": _now(), "done": True,
                "done_reason": "unload", "message": {"role": "assistant", "content": ""}}
    service = await serving(request, body.model, keep_alive_seconds(body.keep_alive))
    settings = _settings(service, body)
    if not body.messages:  # Ollama's way to load a model: nothing to say
        return {"model": service.model_id, "created_at": _now(), "done": True,
                "done_reason": "load", "message": {"role": "assistant", "content": ""}}
    tools = [t.model_dump() for t in body.tools or []] or None
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    for m in messages:  # Ollama sends arguments as objects and no ids
        for call in m.get("tool_calls") or []:
            call.setdefault("id", None)
    ids = service.chat_ids(messages, tools)
    events = service.run(ids, is_disconnected=request.is_disconnected, **settings)

    def message(text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": text}

    def piece(text: str) -> dict[str, Any]:
        return {"model": service.model_id, "created_at": _now(), "message": message(text),
                "done": False}

    tool_calls = ToolCallReply(service.tokenizer, tools)

    def finish(text: str, done: Stats, started: float, streamed: bool = False) -> dict:
        first = done.tokens[0] if done.tokens else None
        called, calls = tool_calls.starts(first), tool_calls.calls(first, text)
        reply = message("" if streamed and not called else text)  # held text is not lost
        if calls:
            reply = {"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": c["function"]["name"],
                                                  "arguments": json.loads(
                                                      c["function"]["arguments"] or "{}")}}
                                    for c in calls]}
        return {**_final(service, done, started), "message": reply}

    return await _respond(service, events, body.stream, piece, finish, held=tool_calls.starts)


@router.post("/generate", responses={200: {"content": NDJSON}})
async def generate(body: OllamaGenerateRequest, request: Request):
    if not body.prompt and _unloaded(request, body):
        return {"model": body.model, "created_at": _now(), "response": "", "done": True,
                "done_reason": "unload"}
    service = await serving(request, body.model, keep_alive_seconds(body.keep_alive))
    settings = _settings(service, body)
    if not body.prompt:
        return {"model": service.model_id, "created_at": _now(), "response": "", "done": True,
                "done_reason": "load"}
    if body.raw:
        ids = service.text_ids(body.prompt)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        ids = service.chat_ids([*system, {"role": "user", "content": body.prompt}])
    events = service.run(ids, is_disconnected=request.is_disconnected, **settings)

    def piece(text: str) -> dict[str, Any]:
        return {"model": service.model_id, "created_at": _now(), "response": text,
                "done": False}

    def finish(text: str, done: Stats, started: float, streamed: bool = False) -> dict:
        return {**_final(service, done, started), "response": "" if streamed else text}

    return await _respond(service, events, body.stream, piece, finish)


def _details(s: ModelSummary) -> dict[str, Any]:
    return {"parent_model": "", "format": s.format, "family": s.family, "families": [s.family],
            "parameter_size": s.parameter_size, "quantization_level": s.stored_as}


def _model_info(s: ModelSummary, context: int) -> dict[str, Any]:
    """Ollama's model_info: GGUF keys under the model's own architecture, the experts' only
    for a mixture of experts."""
    arch = s.family
    info = {"general.architecture": arch, "general.parameter_count": s.parameters,
            f"{arch}.context_length": context, f"{arch}.block_count": s.layers}
    if s.experts:
        info |= {f"{arch}.expert_count": s.experts, f"{arch}.expert_used_count": s.top_k}
    return info


def _when(created: int) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat()


@router.get("/tags")
async def tags(request: Request):
    models = getattr(request.app.state, "models", None)
    listed = [(e.name, e.summary, e.created) for e in models.entries.values()] \
        if models is not None else [(s.model_id, s.described(), s.created)
                                    for s in [service_of(request)]]
    return {"models": [{"name": name, "model": name, "modified_at": _when(created),
                        "size": summary.disk_bytes, "digest": "", "details": _details(summary)}
                       for name, summary, created in listed]}


@router.get("/ps")
async def ps(request: Request):
    """The models loaded now, with their sizes and when they unload."""
    models = getattr(request.app.state, "models", None)
    if models is not None:
        return {"models": models.running()}
    service = service_of(request)
    summary = service.described()
    return {"models": [{"name": service.model_id, "model": service.model_id,
                        "size": summary.memory_bytes, "size_vram": summary.memory_bytes,
                        "digest": "", "expires_at": FOREVER, "details": _details(summary)}]}


@router.post("/show")
async def show(body: OllamaShowRequest, request: Request):
    service = await serving(request, body.model or body.name or "")
    s = service.described()
    return {"modelfile": "", "parameters": "", "template": "",
            "details": _details(s),
            "model_info": _model_info(s, service.context),
            "capabilities": ["completion"] + (["tools"] if service.calls_tools else []),
            "modified_at": _when(service.created)}


@router.get("/version")
async def version():
    return {"version": __version__}
