"""Which tool-call format a model speaks, and each format's knowledge in one place: how it is
detected, how a call is written (Lark rules for the grammar engine), how a reply starts a call
and how a call is read back as OpenAI `tool_calls`.

- mistral-v3: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"}; the prompt is encoded
  token-exact with mistral-common (tools.py).
- hermes (Qwen 2.5 / 3, Hermes 2 Pro ...): each call is `<tool_call>\\n{"name", "arguments"}
  \\n</tool_call>`; the template's source writes `<tool_call>`, which must be one token.
- llama3-json (Llama 3.1 / 3.2 / 3.3): one call, `{"name", "parameters"}`, as the reply.

The last two speak through the model's own chat template: it is rendered with `tools` and the
conversation's calls and results in transformers' conventions (an assistant's `tool_calls` with
their arguments as objects, `tool` messages with the `tool_call_id` and the function's `name`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import ChatFormatError
from .chat_format import clean_text, detect_chat_format
from .protocol import Codec
from .template import render_template, template_variables
from .tools import (
    calls_schema,
    can_call_tools,
    json_arguments,
    mistral_v3_tool_ids,
    new_call_id,
    parse_tool_calls,
    text_of,
    tool_spec,
)

# Why a model cannot call tools, after "the model X cannot call tools: ".
NO_TOOL_FORMAT = ("it has neither Mistral v3's tool tokens nor a chat template that takes "
                  "tools and writes calls as Hermes' <tool_call> or Llama 3.1's JSON")


def cannot_call_tools(model: str) -> str:
    return f"the model {model!r} cannot call tools: {NO_TOOL_FORMAT}"


@dataclass(frozen=True)
class CallSyntax:
    """A format's calls as Lark rules: `call` is the whole reply's calls; each rule named in
    `json` is JSON following its schema (the grammar module writes those rules, so its policy
    on extra keys and layout applies)."""

    rules: str
    json: dict[str, dict[str, Any]]
    text_starts: tuple[str, ...] = ()  # what a reply of text may not start with


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "mistral-v3", "hermes" or "llama3-json"
    start_token: int | None  # the one token a call starts with (None: it starts with "{")

    def starts(self, tokenizer: Codec, first_token: int | None) -> bool:
        """Whether a reply whose first token is `first_token` is a call."""
        if first_token is None:
            return False
        if self.start_token is not None:
            return first_token == self.start_token
        return tokenizer.decode([first_token]).startswith("{")

    def syntax(self, tokenizer: Codec, tools: list[dict[str, Any]], only: str | None,
               parallel: bool) -> CallSyntax:
        """The calls a reply may make: one of `tools` each (or only the tool `only`), with
        arguments that follow its parameter schema; one call unless `parallel`."""
        listed = calls_schema(tools, only, parallel)
        if self.name == "mistral-v3":
            return CallSyntax(f'call: <[{self.start_token}]> " "? calls\n', {"calls": listed})
        one = listed["items"]
        if self.name == "hermes":
            close = _marker(tokenizer, "</tool_call>")
            rules = ('call: one ("\\n" one)*\n' if parallel else "call: one\n") + \
                f'one: <[{self.start_token}]> "\\n" body "\\n" {close}\n'
            return CallSyntax(rules, {"body": one}, ("<tool_call>",))
        # Llama 3.1 calls one function at a time, its arguments under "parameters".
        renamed = [_renamed(s, "arguments", "parameters") for s in one.get("anyOf", [one])]
        return CallSyntax("call: body\n", {"body": renamed[0] if len(renamed) == 1
                                           else {"anyOf": renamed}}, ("{",))

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI `tool_calls` from a reply's text (its special tokens left out), or None
        when it is not whole calls."""
        if self.name == "mistral-v3":
            return parse_tool_calls(text)
        if self.name == "hermes":
            bodies = _json_objects(text, "<tool_call>", "</tool_call>")
            key = "arguments"
        else:
            bodies = _json_objects(text)
            key = "parameters"
            if bodies is not None and len(bodies) != 1:
                return None
        if not bodies:
            return None
        calls = []
        for body in bodies:
            arguments = body.get(key, body.get("arguments", {}))
            if not isinstance(body.get("name"), str) or not isinstance(arguments, dict):
                return None
            calls.append({"id": new_call_id(), "type": "function",
                          "function": {"name": body["name"],
                                       "arguments": json.dumps(arguments, ensure_ascii=False)}})
        return calls


def _renamed(schema: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    props = schema["properties"]
    return {**schema, "required": [new if r == old else r for r in schema["required"]],
            "properties": {new if k == old else k: v for k, v in props.items()}}


def _json_objects(text: str, open_mark: str = "", close_mark: str = ""
                  ) -> list[dict[str, Any]] | None:
    """The JSON objects `text` holds one after another, each maybe between `open_mark` and
    `close_mark` (left out of the text when they are special tokens), whitespace between; or
    None. (Read in place, so that a marker inside an argument's string stays in it.)"""
    decoder, out, at = json.JSONDecoder(), [], 0

    def skip(mark: str) -> None:
        nonlocal at
        while at < len(text) and text[at].isspace():
            at += 1
        if mark and text.startswith(mark, at):
            at += len(mark)
        while at < len(text) and text[at].isspace():
            at += 1

    skip(open_mark)
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict):
            return None
        out.append(value)
        skip(close_mark)
        skip(open_mark)
    return out


def _single_token(tokenizer: Codec, text: str) -> int | None:
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 else None


def _marker(tokenizer: Codec, text: str) -> str:
    """`text` in a Lark rule: its token when it is one, else the text."""
    token = _single_token(tokenizer, text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


@lru_cache(maxsize=16)
def _template_family(template: str) -> str | None:
    """The call format a chat template writes, when it takes `tools`."""
    if "tools" not in template_variables(template):
        return None
    if "<tool_call>" in template and not re.search(r"<tool_call>(\\n|\n)<function=", template):
        return "hermes"
    if '"parameters": ' in template and '{"name": "' in template:
        return "llama3-json"
    return None


def tool_format(tokenizer: Codec) -> ToolFormat | None:
    """The tool-call format of a model, or None when it cannot call tools."""
    chat_format = detect_chat_format(tokenizer)
    if chat_format == "mistral-v3":
        return ToolFormat("mistral-v3", tokenizer.token_id("[TOOL_CALLS]")) \
            if can_call_tools(tokenizer) else None
    if chat_format != "template" or not tokenizer.chat_template:
        return None
    family = _template_family(tokenizer.chat_template)
    if family == "hermes":
        start = _single_token(tokenizer, "<tool_call>")
        return ToolFormat("hermes", start) if start is not None else None
    return ToolFormat(family, None) if family else None


# ---- prompts through the model's template ---------------------------------------------------

def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError("a tool call must have a function with a name")
    arguments = json_arguments(fn.get("arguments") or "{}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
    return {**out, "id": call["id"]} if call.get("id") else out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation as transformers hands it to templates: text content, tool calls with
    their arguments as objects, tool results with the name of the function they answer."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ChatFormatError(f"unknown role {role!r}; expected system, user, assistant "
                                  "or tool")
        message: dict[str, Any] = {"role": role, "content": text_of(m.get("content"), role)}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
            names |= {c["id"]: c["function"]["name"] for c in message["tool_calls"]
                      if c.get("id")}
        if role == "tool":
            call_id = m.get("tool_call_id")
            if isinstance(call_id, str) and call_id:
                message["tool_call_id"] = call_id
            name = m.get("name") or names.get(call_id or "")
            if name:
                message["name"] = name
        out.append(message)
    if not any(m["role"] == "user" for m in out):
        raise ChatFormatError("the conversation has no user message")
    return out


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Function tools as the request gives them (unset fields left out), checked."""
    out = []
    for tool in tools:
        tool_spec(tool)  # (refuses what is not a function tool)
        fn = {k: v for k, v in tool["function"].items() if v is not None}
        out.append({"type": "function", "function": fn})
    return out


def template_tool_text(tokenizer: Codec, messages: list[dict[str, Any]],
                       tools: list[dict[str, Any]] | None) -> str:
    """The prompt of a conversation with tools, rendered by the model's template."""
    bos = tokenizer.decode_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    return clean_text(render_template(
        tokenizer.chat_template, template_messages(messages), True, bos_token=bos,
        eos_token=tokenizer.decode_piece(tokenizer.eos_id),
        tools=template_tools(tools) if tools else None))


def tool_prompt_ids(tokenizer: Codec, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None) -> list[int]:
    """The prompt of a conversation that may hold tools, calls and results, in the model's
    tool format; ChatFormatError when the model has none."""
    fmt = tool_format(tokenizer)
    if fmt is None:
        raise ChatFormatError(f"the model cannot call tools: {NO_TOOL_FORMAT}")
    if fmt.name == "mistral-v3":
        return mistral_v3_tool_ids(tokenizer, messages, tools)
    return tokenizer.encode(template_tool_text(tokenizer, messages, tools))


class ToolCallReply:
    """How the APIs tell a tool call from text: when the request offered tools, a reply that
    starts as the model's calls start (`ToolFormat.starts`) is a call. Its text is held back
    (not streamed) and parsed whole at the end; text that does not parse is given back as
    text."""

    def __init__(self, tokenizer: Codec, tools: list[dict[str, Any]] | None) -> None:
        self.tokenizer = tokenizer
        self.format = tool_format(tokenizer) if tools else None

    def starts(self, first_token: int | None) -> bool:
        """Whether a reply starting with `first_token` is a tool call (hold its text back)."""
        return self.format is not None and self.format.starts(self.tokenizer, first_token)

    def calls(self, first_token: int | None, text: str) -> list[dict[str, Any]] | None:
        """OpenAI `tool_calls` of a whole reply, or None when it is text."""
        return self.format.parse(text) if self.starts(first_token) else None
