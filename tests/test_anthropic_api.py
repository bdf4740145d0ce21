"""Anthropic's Messages API (`/v1/messages`), driven by the official `anthropic` client against a
real `serve` of a random tiny Mixtral with the Mistral v3 tokenizer: mistral-common's encoding
of the same conversation is the oracle for the prompts, and the client's own parsing checks the
shapes of replies, events and errors."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from server_helpers import TEST_BLOCK, V3_TOKENIZER, Server, serve_tiny_v3

KEY = "sesame"
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "required": ["city"],
                            "properties": {"city": {"type": "string", "maxLength": 6}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from serve_tiny_v3(tmp_path_factory, "--api-key", KEY, "--model-id", "tiny")


def claude(server: Server, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def reference(messages: list, tools: list | None = None) -> list[int]:
    """mistral-common's tokens for a conversation."""
    tokenizer = MistralTokenizer.from_file(str(V3_TOKENIZER))
    return tokenizer.encode_chat_completion(
        ChatCompletionRequest(messages=messages, tools=tools)).tokens


def test_create_and_stream_give_the_same_reply(tiny):
    c = claude(tiny)
    kwargs = dict(model="tiny", max_tokens=12, system="Be brief.", messages=ASK,
                  extra_body=GREEDY)
    whole = c.messages.create(**kwargs)
    assert whole.role == "assistant" and whole.stop_reason == "max_tokens"
    assert whole.usage.output_tokens == 12
    with c.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    deltas = [e for e in kinds if e == "text"]
    assert final.content[0].text == whole.content[0].text and len(deltas) > 1
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    # the second time the prompt came from the store (its whole blocks but the token fed to
    # the model)
    prompt = len(reference([SystemMessage(content="Be brief."), UserMessage(content=ASK[0][
        "content"])]))
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == prompt
    assert final.usage.cache_read_input_tokens >= prompt - TEST_BLOCK


def test_stop_sequences(tiny):
    c = claude(tiny)
    free = c.messages.create(model="tiny", max_tokens=12, messages=ASK, extra_body=GREEDY)
    text = free.content[0].text
    stop = text[len(text) // 2:][:2].strip() or text[-1]
    cut = c.messages.create(model="tiny", max_tokens=12, messages=ASK, stop_sequences=[stop],
                            extra_body=GREEDY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]


def test_a_tool_round_trip_is_token_exact_with_mistral_common(tiny):
    c, oa = claude(tiny), openai.OpenAI(base_url=tiny.url + "/v1", api_key=KEY, max_retries=0)
    call = c.messages.create(model="tiny", max_tokens=30, messages=ASK, tools=[WEATHER],
                             tool_choice={"type": "tool", "name": "get_weather",
                                          "disable_parallel_tool_use": True},
                             extra_body={"temperature": 1, "seed": 3})
    assert call.stop_reason == "tool_use"
    (use,) = call.content
    assert use.type == "tool_use" and use.name == "get_weather"
    conversation = [*ASK, {"role": "assistant", "content": [use.model_dump(
        include={"type", "id", "name", "input"})]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny"}]}]
    answer = c.messages.create(model="tiny", max_tokens=8, system="Be brief.",
                               messages=conversation, tools=[WEATHER], extra_body=GREEDY)
    expected = reference(
        [SystemMessage(content="Be brief."), UserMessage(content=ASK[0]["content"]),
         AssistantMessage(tool_calls=[ToolCall(id=use.id, function=FunctionCall(
             name=use.name, arguments=json.dumps(use.input)))]),
         ToolMessage(tool_call_id=use.id, content="sunny")],
        [Tool(function=Function(name=WEATHER["name"], description=WEATHER["description"],
                                parameters=WEATHER["input_schema"]))])
    counted = c.messages.count_tokens(model="tiny", system="Be brief.", messages=conversation,
                                      tools=[WEATHER])
    assert counted.input_tokens == len(expected)
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == len(expected)
    # mistral-common's tokens as a raw prompt: the prefix store holds their whole blocks, which
    # it does only for the very same tokens. (The replies are not compared: this random model's
    # logits have near ties, the tool id is random, and the raw request recomputes the last
    # prompt tokens alone, so greedy text may part after a few tokens in a float's last bits.)
    raw = oa.completions.create(model="tiny", prompt=expected, max_tokens=8, temperature=0)
    assert raw.usage.prompt_tokens_details.cached_tokens >= len(expected) - TEST_BLOCK


def test_count_tokens_of_a_plain_conversation(tiny):
    messages = [*ASK, {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": [{"type": "text", "text": "And Rome?"}]}]
    counted = claude(tiny).messages.count_tokens(model="tiny", messages=messages,
                                                 system=[{"type": "text", "text": "Hi."}])
    assert counted.input_tokens == len(reference([
        SystemMessage(content="Hi."), UserMessage(content=ASK[0]["content"]),
        AssistantMessage(content="Sunny."), UserMessage(content="And Rome?")]))


def test_output_config_format_is_enforced(tiny):
    schema = {"type": "object", "required": ["mood"],
              "properties": {"mood": {"enum": ["happy", "sad"]},
                             "score": {"type": "integer", "minimum": 0, "maximum": 9}}}
    for seed in range(3):
        reply = claude(tiny).messages.create(
            model="tiny", max_tokens=30, messages=ASK, extra_body={"temperature": 1,
                                                                   "seed": seed},
            output_config={"format": {"type": "json_schema", "schema": schema}})
        assert reply.stop_reason == "end_turn", reply.content
        jsonschema.validate(json.loads(reply.content[0].text), schema)


def test_a_wrong_x_api_key_is_a_401(tiny):
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude(tiny, "wrong").messages.create(model="tiny", max_tokens=2, messages=ASK)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"


BASE = {"model": "tiny", "max_tokens": 2, "messages": ASK}
# (what is wrong, body, status, Anthropic's error type)
BAD = [
    ("malformed JSON", b'{"model": ', 400, "invalid_request_error"),
    ("no max_tokens", {"model": "tiny", "messages": ASK}, 400, "invalid_request_error"),
    ("no messages", {**BASE, "messages": []}, 400, "invalid_request_error"),
    ("temperature above 1", {**BASE, "temperature": 1.5}, 400, "invalid_request_error"),
    ("unsupported field", {**BASE, "thinking": {"type": "enabled"}}, 400,
     "invalid_request_error"),
    ("effort", {**BASE, "output_config": {"effort": "high"}}, 400, "invalid_request_error"),
    ("unknown model", {**BASE, "model": "claude-9"}, 404, "not_found_error"),
    ("tool_use from the user", {**BASE, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]}, 400,
     "invalid_request_error"),
    ("image block", {**BASE, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, 400, "invalid_request_error"),
    ("tool choice without the tool's name", {**BASE, "tools": [WEATHER],
                                             "tool_choice": {"type": "tool"}}, 400,
     "invalid_request_error"),
]


@pytest.mark.parametrize("what,body,status,kind", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_anthropic_errors(tiny, what, body, status, kind):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(tiny.url + "/v1/messages", content=content, timeout=60,
                   headers={"x-api-key": KEY, "content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == kind and error["error"]["message"]
    assert "Traceback" not in error["error"]["message"]
    if what == "unsupported field":
        assert "thinking" in error["error"]["message"]
