"""What constrains a reply, whichever API asked: tool choice, a JSON schema, a GBNF grammar,
logit biases. Each API turns its own fields into these; here they become one llguidance
grammar (the worker's `Job.grammar`) and the sampling's `logit_bias`.

Tool choice is enforced, not hinted: under "required" or a named function the grammar forces
the model's call syntax (`text/tool_formats.py`: Mistral v3's `[TOOL_CALLS]` and a JSON list,
Hermes' `<tool_call>` blocks, Llama 3.1's JSON) with arguments that follow the tools'
parameter schemas; under "auto" the reply is free text or such calls; under "none" the token a
call starts with is banned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import MlxMixtralError
from ..generation.sampling import BAN
from ..text.tool_formats import cannot_call_tools, tool_format
from .service import APIError, Service

Mode = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class ToolChoice:
    mode: Mode = "auto"
    name: str | None = None  # one function the call must be (mode "required")
    parallel: bool = True  # several calls in one reply


AUTO = ToolChoice()


@dataclass(frozen=True)
class Constraints:
    grammar: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


def _compiled(service: Service, build: Any, param: str) -> str:
    """A grammar from `build(tokenizer, vocab_size)`; what llguidance refuses is a 400."""
    try:
        return build(service.tokenizer, service.model.args.vocab_size)
    except MlxMixtralError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def gbnf(service: Service, text: str, param: str = "grammar") -> str:
    from ..generation.grammar import gbnf_grammar

    return _compiled(service, lambda tok, n: gbnf_grammar(text, tok, n), param)


def tool_grammar(service: Service, tools: list[dict[str, Any]], choice: ToolChoice,
                 param: str = "tool_choice") -> str | None:
    """The grammar that enforces `choice` over `tools` (None: nothing to enforce)."""
    from ..generation.grammar import call_grammar

    if not tools and choice.mode == "required":
        raise APIError(400, f"{param}: a call is required, but no tools are given",
                       param=param)
    if not tools or choice.mode == "none":
        return None
    fmt = tool_format(service.tokenizer)
    if fmt is None:
        raise APIError(400, cannot_call_tools(service.model_id), param="tools")
    try:
        syntax = fmt.syntax(service.tokenizer, tools, choice.name, choice.parallel)
    except MlxMixtralError as e:
        raise APIError(400, str(e), param=param) from None
    return _compiled(service, lambda tok, n: call_grammar(
        syntax, choice.mode == "auto", tok, n), "tools")


def constraints(service: Service, tools: list[dict[str, Any]] | None = None,
                choice: ToolChoice = AUTO, output: str | None = None,
                bias: dict[int, float] | None = None) -> Constraints:
    """One grammar and the biases for a request. A required call's grammar wins over `output`
    (a response format's); under "auto" a response format wins (the reply is its text), else
    the reply is text or a call; "none" bans the call token."""
    calls = tool_grammar(service, tools or [], choice)
    if choice.mode == "auto" and output is not None:
        calls = None  # the reply must follow the response format: that is text
    biases = {int(t): max(-100.0, min(100.0, float(b))) for t, b in (bias or {}).items()}
    fmt = tool_format(service.tokenizer) if choice.mode == "none" else None
    if fmt is not None and fmt.start_token is not None:
        biases[fmt.start_token] = BAN
    return Constraints(calls or output, tuple(sorted(biases.items())))


def refuse_unsupported(names: list[str]) -> None:
    """A 400 naming the first field this server does not implement."""
    if names:
        raise APIError(400, f"{names[0]}: this server does not support the field, and "
                       "ignoring it could change the output", param=names[0],
                       code="unsupported_field")
