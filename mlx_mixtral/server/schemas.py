"""The request bodies the server accepts, validated by Pydantic before anything runs.

Fields follow OpenAI's and Ollama's APIs; wrong types and out-of-range values are refused with a
400 that names the field. An unknown field at the top of an OpenAI, Anthropic or Responses
request is refused too (a 400 naming it: it may change the output, and ignoring it would hide
that), unless it is one of the `HARMLESS` ones clients send; inside messages they are ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..generation.sampling import SETTINGS, Setting

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOPS = 8


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Fields that change nothing in the output: bookkeeping, storage, routing, stream framing.
HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "stream_options",
                      "prompt_cache_key", "safety_identifier", "anthropic_version",
                      "background", "include", "truncation", "context_management",
                      "container", "mcp_servers", "cache_control", "inference_geo", "speed",
                      "user_profile_id", "workspace_id", "diagnostics"})


class Checked(BaseModel):
    """A request whose unknown fields are kept, to be refused unless `HARMLESS`."""

    model_config = ConfigDict(extra="allow")

    def unsupported(self) -> list[str]:
        return sorted(k for k in self.model_extra or {} if k not in HARMLESS)


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


class ToolName(_Body):
    name: str


class NamedTool(_Body):
    """OpenAI's {"type": "function", "function": {"name": ...}}."""

    type: Literal["function"] = "function"
    function: ToolName


class JsonSchemaFormat(_Body):
    name: str = "output"
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # llama.cpp's {"type": "json_object", "schema": ...}
    object_schema: dict[str, Any] | None = Field(default=None, alias="schema")


def _bounds(s: Setting) -> dict[str, float]:
    bounds = {"ge": s.lo}
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


class Sampling(_sampling_fields("openai"), Checked):
    """What chat and completion requests share, with llama.cpp's `grammar` (GBNF) and
    `json_schema` fields."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=128)
    user: str | None = None
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

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
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool = True


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


# ---- Anthropic's Messages API ------------------------------------------------------------------

class AnthropicText(_Body):
    type: Literal["text"]
    text: str


class AnthropicToolUse(_Body):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)


class AnthropicToolResult(_Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[AnthropicText] = ""
    is_error: bool = False

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)


AnthropicBlock = Annotated[AnthropicText | AnthropicToolUse | AnthropicToolResult,
                           Field(discriminator="type")]


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(_Body):
    type: Literal["custom"] | None = None  # (server tools such as web search: refused)
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class AnthropicFormat(_Body):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class AnthropicOutputConfig(_Body):
    format: AnthropicFormat | None = None
    effort: str | None = None  # (refused: this server has no such knob)


class AnthropicCount(Checked):
    model: str = Field(min_length=1, max_length=512)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicText] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None


class AnthropicRequest(AnthropicCount):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOPS)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0)  # ours, as on the other APIs
    output_config: AnthropicOutputConfig | None = None


# ---- OpenAI's Responses API ---------------------------------------------------------------------

class ResponsesPart(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class ResponsesItem(_Body):
    """A message (type may be left out), a function call or a function call's output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ResponsesPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponsesTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedTool(_Body):
    type: Literal["function"]
    name: str


class ResponsesFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Body):
    format: ResponsesFormat | None = None


class ResponsesRequest(Checked):
    model: str = Field(min_length=1, max_length=512)
    input: str | list[ResponsesItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool = True
    text: ResponsesText | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0)  # ours, as on Chat Completions
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] | None = None
    user: str | None = None


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


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


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
