"""Tool choice enforced by the grammar engine, on Chat Completions, Anthropic's Messages and
OpenAI's Responses, against a real `serve` of a random tiny Mixtral with the Mistral v3
tokenizer: "required" and a named function return a call whose arguments validate against the
tool's schema (jsonschema, the oracle) whatever the random weights sample; "none" never calls."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
from server_helpers import V3_TOKENIZER, Server, serve_tiny_v3

from mlx_mixtral.text.tokenizer import SentencePieceTokenizer

KEY = "sesame"
SEEDS = range(20)
# Bounded strings and numbers, so that a random model's call ends within a few tokens.
WEATHER = {"type": "object", "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 6},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
CLOCK = {"type": "object", "required": ["zone"], "properties": {"zone": {"enum": ["UTC", "CET"]}}}
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
OPENAI_TOOLS = [{"type": "function", "function": {"name": n, "description": n, "parameters": s}}
                for n, s in SCHEMAS.items()]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
OURS = SentencePieceTokenizer(V3_TOKENIZER)
CALL_TOKEN = OURS.token_id("[TOOL_CALLS]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from serve_tiny_v3(tmp_path_factory, "--api-key", KEY, "--max-tokens", "40",
                             "--model-id", "tiny")


def chat(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _valid(calls: list[tuple[str, dict]], only: str | None) -> None:
    assert len(calls) == 1, calls  # parallel calls are off
    name, arguments = calls[0]
    assert name in SCHEMAS and (only is None or name == only), name
    jsonschema.validate(arguments, SCHEMAS[name])


def _chat_calls(server: Server, seed: int, choice) -> list[tuple[str, dict]]:
    reply = chat(server).chat.completions.create(
        model="tiny", messages=ASK, tools=OPENAI_TOOLS, tool_choice=choice, temperature=1,
        seed=seed, parallel_tool_calls=False)
    calls = reply.choices[0].message.tool_calls or []
    assert (reply.choices[0].finish_reason == "tool_calls") == bool(calls)
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def _messages_calls(server: Server, seed: int, choice) -> list[tuple[str, dict]]:
    reply = claude(server).messages.create(
        model="tiny", max_tokens=40, messages=ASK, tool_choice=choice,
        tools=[{"name": n, "description": n, "input_schema": s} for n, s in SCHEMAS.items()],
        extra_body={"temperature": 1, "seed": seed})
    calls = [(b.name, b.input) for b in reply.content if b.type == "tool_use"]
    assert (reply.stop_reason == "tool_use") == bool(calls)
    return calls


def _responses_calls(server: Server, seed: int, choice) -> list[tuple[str, dict]]:
    reply = chat(server).responses.create(
        model="tiny", input=ASK, tool_choice=choice, temperature=1, parallel_tool_calls=False,
        tools=[{"type": "function", "name": n, "parameters": s} for n, s in SCHEMAS.items()],
        max_output_tokens=40, extra_body={"seed": seed})
    return [(i.name, json.loads(i.arguments)) for i in reply.output if i.type == "function_call"]


# (API, how it says "required", how it names get_weather)
APIS = {
    "chat": (_chat_calls, "required", {"type": "function", "function": {"name": "get_weather"}}),
    "messages": (_messages_calls, {"type": "any", "disable_parallel_tool_use": True},
                 {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    "responses": (_responses_calls, "required", {"type": "function", "name": "get_weather"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("named", [False, True], ids=["required", "named"])
def test_forced_calls_follow_the_tool_schema(tiny, api, named):
    calls_of, required, get_weather = APIS[api]
    for seed in SEEDS:
        _valid(calls_of(tiny, seed, get_weather if named else required),
               "get_weather" if named else None)


def test_none_never_calls_even_when_the_model_wants_to(tiny):
    """No call under "none" on any API; and with +100 on the call token (the model's sure
    choice otherwise) the first token is still text: "none" bans it."""
    for api, (calls_of, _, _) in APIS.items():
        none = {"type": "none"} if api == "messages" else "none"
        for seed in range(3):
            assert calls_of(tiny, seed, none) == [], api
    reply = chat(tiny).chat.completions.create(
        model="tiny", messages=ASK, tools=OPENAI_TOOLS, tool_choice="none", max_tokens=4,
        logit_bias={str(CALL_TOKEN): 100}, temperature=0, logprobs=True)
    assert not reply.choices[0].message.tool_calls
    first = reply.choices[0].logprobs.content[0].token
    assert first != OURS.decode([CALL_TOKEN]) and first in reply.choices[0].message.content


def test_auto_lets_the_model_call_and_then_holds_the_call_to_the_schema(tiny):
    """Pushed to start a call (+100 on [TOOL_CALLS]) under "auto", the model's call is whole
    and valid; unpushed, a random model writes text."""
    for seed in range(5):
        reply = chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=OPENAI_TOOLS, tool_choice="auto", temperature=1,
            seed=seed, logit_bias={str(CALL_TOKEN): 100}, parallel_tool_calls=False)
        assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
        _valid([(c.function.name, json.loads(c.function.arguments))
                for c in reply.choices[0].message.tool_calls], None)
    text = chat(tiny).chat.completions.create(model="tiny", messages=ASK, tools=OPENAI_TOOLS,
                                              temperature=0, max_tokens=4)
    assert text.choices[0].finish_reason == "length" and text.choices[0].message.content


def test_parallel_calls_when_allowed(tiny):
    """With parallel calls allowed, some reply holds several calls, each valid."""
    counts = []
    for seed in range(10):
        reply = chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=[OPENAI_TOOLS[1]], tool_choice="required",
            temperature=1, seed=seed, max_tokens=60)
        calls = reply.choices[0].message.tool_calls or []
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), CLOCK)
        counts.append(len(calls))
    assert max(counts) > 1, counts


def test_a_named_function_is_called_exactly_once(tiny):
    """OpenAI's named function is exactly one call, also with parallel calls allowed (the
    default, which instructor's TOOLS mode leaves on): on the seeds where "required" makes
    several calls (above), a named one makes one, on Chat Completions and Responses."""
    for seed in range(10):
        reply = chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=[OPENAI_TOOLS[1]], temperature=1, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60)
        assert len(reply.choices[0].message.tool_calls or []) == 1, reply.choices[0]
        answer = chat(tiny).responses.create(
            model="tiny", input=ASK, tools=[{"type": "function", "name": "get_time",
                                             "parameters": CLOCK}],
            tool_choice={"type": "function", "name": "get_time"}, temperature=1,
            max_output_tokens=60, extra_body={"seed": seed})
        assert [i.type for i in answer.output] == ["function_call"], answer.output


def test_a_call_that_cannot_be_made_is_a_400(tiny):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=OPENAI_TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="no tools"):
        chat(tiny).responses.create(model="tiny", input="x", tool_choice="required")
