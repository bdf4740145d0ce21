"""The request bodies the server accepts, validated by Pydantic before anything runs.

Fields follow OpenAI's and Ollama's APIs; unknown fields are ignored (clients send many), wrong
types and out-of-range values are refused with a 400 that names the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..generation.sampling import SETTINGS, Setting

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOPS = 8


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class JsonSchemaFormat(_Body):
    name: str = "output"
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _bounds(s: Setting) -> dict[str, float]:
    bounds = {"gt" if s.above_lo else "ge": s.lo}
    hi = s.hi if s.api_hi is None else s.api_hi
    return bounds if hi == math.inf else {**bounds, "le": hi}


def _sampling_fields(api: str) -> type[_Body]:
    """The sampling settings `api` offers, by its names, each optional (left out: the
    server's default), from `generation.sampling.SETTINGS`."""
    fields: dict[str, Any] = {
        wire: (s.kind | None, Field(default=None, **_bounds(s)))
        for s in SETTINGS if (wire := s.wire_name(api))}
    return create_model(f"{api.title()}SamplingFields", __base__=_Body, **fields)


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_sampling_fields("openai")):
    """What chat and completion requests share."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=128)
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"stop takes at most {MAX_STOPS} strings")
        return [s for s in stops if s]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


# ---- Ollama -----------------------------------------------------------------------------------

class OllamaOptions(_sampling_fields("ollama")):
    num_predict: int | None = None  # Ollama's meaning: -1 is as long as the context allows
    stop: list[str] | None = None


class OllamaMessage(_Body):
    role: Role
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None


class OllamaBase(_Body):
    model: str = Field(min_length=1, max_length=512)
    stream: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | None = None


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None


class OllamaGenerateRequest(OllamaBase):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class OllamaShowRequest(_Body):
    model: str = Field(default="", max_length=512)
    name: str | None = None  # older clients


# ---- errors, as documented in the OpenAPI schema ----------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: ErrorDetail


class OllamaError(BaseModel):
    error: str


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    why = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
           413: "body too large", 500: "generation failed", 503: "queue full"}
    return {status: {"model": model, "description": text} for status, text in why.items()}


# A server-sent event, as OpenAPI 3.2 describes a stream's items (each `data` is a JSON chunk,
# or "[DONE]").
STREAMS = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                   "id": {"type": "string"}, "retry": {"type": "integer"}}}}}
NDJSON = {"application/x-ndjson": {"schema": {"type": "string"}}}
