"""Tool calling in the Mistral v3 format, token-exact with mistral-common.

A conversation with tools is encoded as mistral-common's `InstructTokenizerV3` encodes it:

    <s>[INST] user [/INST] ... [AVAILABLE_TOOLS] [tools as JSON] [/AVAILABLE_TOOLS]
    [INST] (system prompt + "\\n\\n") last user message [/INST]
    [TOOL_CALLS] [{"name", "arguments", "id"}] </s>
    [TOOL_RESULTS] {"content", "call_id"} [/TOOL_RESULTS]

The tool list goes just before the last user message. The model answers with `[TOOL_CALLS]`
and a JSON list of calls, which `parse_tool_calls` turns into OpenAI `tool_calls`. (Which
format a model speaks, this one or its chat template's, is told in `tool_formats.py`, which
also uses the tool checks and the calls' schema here.)
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from ..errors import ChatFormatError
from .chat_format import JOIN, clean_text
from .protocol import Codec

TOOL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
               "[/TOOL_RESULTS]", "[INST]", "[/INST]")
CALL_ID_CHARS = string.ascii_letters + string.digits


def can_call_tools(tokenizer: Codec) -> bool:
    """Whether the vocabulary has the v3 tool control tokens."""
    return all(tokenizer.token_id(t) is not None for t in TOOL_TOKENS)


def new_call_id() -> str:
    """A call id as Mistral's models write them: nine letters and digits."""
    return "".join(secrets.choice(CALL_ID_CHARS) for _ in range(9))


def json_arguments(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; mistral-common re-reads it as JSON if it can."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def tool_spec(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError("each tool must be {'type': 'function', 'function': {'name', ...}}")
    return {"type": "function", "function": {"name": fn["name"],
                                             "description": fn.get("description") or "",
                                             "parameters": fn.get("parameters") or {}}}


def _calls_json(calls: list[dict[str, Any]]) -> str:
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError("a tool call must have a function with a name")
        item = {"name": fn["name"], "arguments": json_arguments(fn.get("arguments", "{}"))}
        if call.get("id") and call["id"] != "null":
            item["id"] = call["id"]
        out.append(item)
    return json.dumps(out, ensure_ascii=False)


def text_of(content: Any, role: str) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: only text here
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        if not all(isinstance(p, str) for p in parts):
            raise ChatFormatError(f"{role} content parts must be text")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ChatFormatError(f"{role} message content must be text")
    return clean_text(content)


def mistral_v3_tool_ids(tokenizer: Codec, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None) -> list[int]:
    """The prompt for a conversation that may hold tools, tool calls and tool results."""
    tid = tokenizer.token_id
    system = [text_of(m.get("content"), "system") for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    # Consecutive user messages become one, as mistral-common joins them.
    merged: list[dict[str, Any]] = []
    for m in turns:
        role = m.get("role")
        if role not in ("user", "assistant", "tool"):
            raise ChatFormatError(f"unknown role {role!r}; expected system, user, assistant "
                                  "or tool")
        if role == "user" and merged and merged[-1]["role"] == "user":
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + JOIN
                          + text_of(m.get("content"), "user")}
        else:
            merged.append(m if role != "user" else {"role": "user",
                                                    "content": text_of(m.get("content"), "user")})
    users = [i for i, m in enumerate(merged) if m["role"] == "user"]
    if not users:
        raise ChatFormatError("the conversation has no user message")
    last_user = users[-1]
    ids = [tokenizer.bos_id]
    for i, m in enumerate(merged):
        if m["role"] == "user":
            content = m["content"]
            if i == last_user:
                if tools:
                    specs = json.dumps([tool_spec(t) for t in tools], ensure_ascii=False)
                    ids += [tid("[AVAILABLE_TOOLS]"), *tokenizer.encode(specs),
                            tid("[/AVAILABLE_TOOLS]")]
                if system:
                    content = JOIN.join(system) + JOIN + content
            ids += [tid("[INST]"), *tokenizer.encode(content), tid("[/INST]")]
        elif m["role"] == "assistant":
            calls = m.get("tool_calls")
            if calls:
                ids += [tid("[TOOL_CALLS]"), *tokenizer.encode(_calls_json(calls))]
            else:
                text = text_of(m.get("content"), "assistant").rstrip(" ")
                if not text:
                    raise ChatFormatError("an assistant message needs content or tool_calls")
                ids += tokenizer.encode(text)
            ids.append(tokenizer.eos_id)
        else:
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ChatFormatError("a tool message needs the tool_call_id it answers")
            content = json_arguments(text_of(m.get("content"), "tool"))
            result = json.dumps({"content": content, "call_id": call_id}, ensure_ascii=False)
            ids += [tid("[TOOL_RESULTS]"), *tokenizer.encode(result), tid("[/TOOL_RESULTS]")]
    return ids


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` from the text the model wrote after `[TOOL_CALLS]` (a JSON list of
    {"name", "arguments"}, or one such object); None when it is not that."""
    try:
        calls = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        out.append({"id": call.get("id") if isinstance(call.get("id"), str) else new_call_id(),
                    "type": "function",
                    "function": {"name": call["name"],
                                 "arguments": arguments if isinstance(arguments, str)
                                 else json.dumps(arguments, ensure_ascii=False)}})
    return out


def calls_schema(tools: list[dict[str, Any]], only: str | None = None,
                 parallel: bool = True) -> dict[str, Any]:
    """The JSON schema of what follows `[TOOL_CALLS]`: a list of {"name", "arguments"}, each
    naming one of `tools` (or only the tool `only`) with arguments that follow its parameter
    schema; one call unless `parallel`."""
    specs = [tool_spec(t)["function"] for t in tools]
    if only is not None:
        specs = [s for s in specs if s["name"] == only]
        if not specs:
            raise ChatFormatError(f"tool_choice names the function {only!r}, which is not "
                                  "among the tools")
    items = [{"type": "object", "required": ["name", "arguments"],
              "properties": {"name": {"const": s["name"]},
                             "arguments": s["parameters"] or {"type": "object",
                                                              "properties": {}}}}
             for s in specs]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    return schema if parallel else {**schema, "maxItems": 1}
