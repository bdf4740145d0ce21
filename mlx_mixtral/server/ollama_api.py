"""Ollama's API: /api/chat and /api/generate (streamed as NDJSON by default), /api/tags,
/api/show and /api/version, so Ollama clients and tools set up for Ollama work unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import __version__
from ..generation.stats import Stats
from ..text.tools import parse_tool_calls
from .schemas import (
    NDJSON,
    OllamaBase,
    OllamaChatRequest,
    OllamaError,
    OllamaGenerateRequest,
    OllamaShowRequest,
    error_responses,
)
from .service import APIError, Service, collect, service_of

router = APIRouter(prefix="/api", responses=error_responses(OllamaError))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _settings(service: Service, body: OllamaBase) -> dict[str, Any]:
    service.check_model(body.model)
    o = body.options
    wanted: dict[str, Any] = {}
    if o is not None:
        length = None if o.num_predict is None or o.num_predict < 0 else max(o.num_predict, 1)
        wanted = dict(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
                      max_tokens=length, seed=o.seed, repetition_penalty=o.repeat_penalty,
                      repetition_context=o.repeat_last_n, presence_penalty=o.presence_penalty,
                      frequency_penalty=o.frequency_penalty)
    grammar = None
    if body.format is not None:
        grammar = service.grammar(None if body.format == "json" else body.format)
    return {"params": service.sampling(**wanted), "grammar": grammar,
            "stop": [s for s in (o.stop or []) if s] if o else []}


def _final(service: Service, s: Stats, started: float) -> dict[str, Any]:
    ns = 1_000_000_000
    return {"model": service.model_id, "created_at": _now(), "done": True,
            "done_reason": "length" if s.finish_reason == "length" else "stop",
            "total_duration": int((time.perf_counter() - started) * ns), "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": int(s.ttft * ns),
            "eval_count": s.generation_tokens,
            "eval_duration": int(s.generation_tokens / max(s.generation_tps, 1e-9) * ns)
            if s.generation_tokens > 1 else 0}


async def _respond(service: Service, events: AsyncIterator, stream: bool, piece,
                   finish, hold_from: int | None = None) -> Any:
    """NDJSON lines while streaming, else one object; `piece(text)` and `finish(text, done)`
    shape them. A reply that starts with the token `hold_from` (a tool call) is not streamed:
    the final line carries it, parsed."""
    started = time.perf_counter()
    if not stream:
        text, _, done = await collect(events)
        return None if done is None else finish(text, done, started)
    first = await anext(events, None)

    async def lines() -> AsyncIterator[str]:
        text, event = "", first
        held = hold_from is not None and getattr(first, "token", None) == hold_from
        try:
            while event is not None:
                if isinstance(event, Stats):
                    yield json.dumps(finish(text, event, started, streamed=True)) + "\n"
                    return
                text += event.text
                if event.text and not held:
                    yield json.dumps(piece(event.text)) + "\n"
                event = await anext(events, None)
        except APIError as e:
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            await events.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/chat", responses={200: {"content": NDJSON}})
async def chat(body: OllamaChatRequest, request: Request):
    service = service_of(request)
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

    calls_token = service.tokenizer.token_id("[TOOL_CALLS]") if tools else None

    def finish(text: str, done: Stats, started: float, streamed: bool = False) -> dict:
        called = calls_token is not None and done.tokens[:1] == [calls_token]
        calls = parse_tool_calls(text) if called else None
        reply = message("" if streamed and not called else text)  # held text is not lost
        if calls:
            reply = {"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": c["function"]["name"],
                                                  "arguments": json.loads(
                                                      c["function"]["arguments"] or "{}")}}
                                    for c in calls]}
        return {**_final(service, done, started), "message": reply}

    return await _respond(service, events, body.stream, piece, finish, hold_from=calls_token)


@router.post("/generate", responses={200: {"content": NDJSON}})
async def generate(body: OllamaGenerateRequest, request: Request):
    service = service_of(request)
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


def _details(service: Service) -> dict[str, Any]:
    d = service.details
    return {"parent_model": "", "format": d.get("format", "safetensors"),
            "family": d.get("family", "mistral"), "families": [d.get("family", "mistral")],
            "parameter_size": d.get("parameter_size", ""),
            "quantization_level": d.get("quantization_level", "")}


@router.get("/tags")
async def tags(request: Request):
    service = service_of(request)
    modified = datetime.fromtimestamp(service.created, timezone.utc).isoformat()
    return {"models": [{"name": service.model_id, "model": service.model_id,
                        "modified_at": modified, "size": service.details.get("size", 0),
                        "digest": service.details.get("digest", ""),
                        "details": _details(service)}]}


@router.post("/show")
async def show(body: OllamaShowRequest, request: Request):
    service = service_of(request)
    service.check_model(body.model or body.name or "")
    args = service.model.args
    return {"modelfile": "", "parameters": "", "template": "",
            "details": _details(service),
            "model_info": {"general.architecture": service.details.get("family", "mistral"),
                           "general.parameter_count": service.details.get("parameters", 0),
                           "llama.context_length": service.context,
                           "llama.block_count": args.num_hidden_layers,
                           "llama.expert_count": getattr(args, "num_local_experts", 0) or 0},
            "capabilities": ["completion"] + (["tools"] if service.details.get("tools")
                                              else []),
            "modified_at": datetime.fromtimestamp(service.created, timezone.utc).isoformat()}


@router.get("/version")
async def version():
    return {"version": __version__}
