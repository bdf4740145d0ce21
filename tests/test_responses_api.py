"""OpenAI's Responses API (`/v1/responses`), driven by the official `openai` client against a
real `serve` of a random tiny Mixtral with the Mistral v3 tokenizer: mistral-common's encoding
is the oracle for prompts, jsonschema for structured output, and the client's own parsing for
the shapes of responses and events."""

from __future__ import annotations

import json

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
from server_helpers import V3_TOKENIZER, Server, serve_tiny_v3

KEY = "sesame"
STORE_BYTES = 16_000
WEATHER = {"type": "object", "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 6}}}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather",
          "parameters": WEATHER}]
# As Pydantic writes a model's schema: no additionalProperties.
PERSON = {"type": "object", "title": "Person", "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
MOOD = {"type": "object", "required": ["mood"],
        "properties": {"mood": {"enum": ["happy", "sad"]}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from serve_tiny_v3(tmp_path_factory, "--api-key", KEY, "--model-id", "tiny",
                             "--response-store-bytes", str(STORE_BYTES))


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference(messages: list, tools: list | None = None) -> list[int]:
    tokenizer = MistralTokenizer.from_file(str(V3_TOKENIZER))
    return tokenizer.encode_chat_completion(
        ChatCompletionRequest(messages=messages, tools=tools)).tokens


def _streamed(c: openai.OpenAI, **kwargs) -> tuple[list[str], str, object]:
    events = list(c.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return kinds, text, events[-1].response


def test_create_and_stream_give_the_same_reply(tiny):
    c = client(tiny)
    kwargs = dict(model="tiny", instructions="Be brief.", input="Hi there", temperature=0,
                  max_output_tokens=10)
    whole = c.responses.create(**kwargs)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == \
        "max_output_tokens"
    assert whole.usage.output_tokens == 10
    assert whole.usage.input_tokens == len(reference([SystemMessage(content="Be brief."),
                                                      UserMessage(content="Hi there")]))
    kinds, text, final = _streamed(c, **kwargs)
    assert text == whole.output_text and final.output_text == text
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    kinds, text, final = _streamed(c, model="tiny", input="Mood?", max_output_tokens=20,
                                   text={"format": {"type": "json_schema", "name": "m",
                                                    "schema": MOOD}})
    assert kinds[-1] == "response.completed" and final.status == "completed"
    assert json.loads(text) in ({"mood": "happy"}, {"mood": "sad"})


def test_json_schema_output_validates_across_seeds(tiny):
    c = client(tiny)
    for seed in range(10):
        reply = c.responses.create(
            model="tiny", input="A person as JSON.", temperature=1, max_output_tokens=40,
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
            extra_body={"seed": seed})
        assert reply.status == "completed", reply.output_text
        person = json.loads(reply.output_text)
        jsonschema.validate(person, PERSON)
        assert set(person) == {"name", "age"}  # closed, as llama.cpp closes it


def test_function_tools_round_trip(tiny):
    c = client(tiny)
    ask = [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}]
    first = c.responses.create(model="tiny", input=ask, tools=TOOLS, tool_choice="required",
                               parallel_tool_calls=False, temperature=1, max_output_tokens=30,
                               extra_body={"seed": 1})
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    kinds, _, streamed = _streamed(c, model="tiny", input=ask, tools=TOOLS,
                                   tool_choice={"type": "function", "name": "get_weather"},
                                   parallel_tool_calls=False, temperature=1,
                                   max_output_tokens=30, extra_body={"seed": 1})
    assert "response.function_call_arguments.done" in kinds
    assert streamed.output[0].arguments == call.arguments
    answer = c.responses.create(
        model="tiny", tools=TOOLS, max_output_tokens=4,
        input=[*ask, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                      "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answer.output[0].type == "message"
    expected = reference(
        [UserMessage(content="Weather?"),
         AssistantMessage(tool_calls=[ToolCall(id=call.call_id, function=FunctionCall(
             name=call.name, arguments=call.arguments))]),
         ToolMessage(tool_call_id=call.call_id, content="sunny")],
        [Tool(function=Function(name="get_weather", description="The weather",
                                parameters=WEATHER))])
    assert answer.usage.input_tokens == len(expected)


def test_previous_response_continues_from_the_cache(tiny):
    c = client(tiny)
    first = c.responses.create(model="tiny", input="Hi", temperature=0, max_output_tokens=6)
    second = c.responses.create(model="tiny", input="More", previous_response_id=first.id,
                                temperature=0, max_output_tokens=6)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == len(reference([
        UserMessage(content="Hi"), AssistantMessage(content=first.output_text),
        UserMessage(content="More")]))
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert c.responses.retrieve(second.id).output_text == second.output_text


def test_unknown_unstored_and_evicted_responses_are_404(tiny):
    c = client(tiny)
    with pytest.raises(openai.NotFoundError, match="resp_nope"):
        c.responses.create(model="tiny", input="x", previous_response_id="resp_nope")
    unstored = c.responses.create(model="tiny", input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="tiny", input="x", previous_response_id=unstored.id)
    oldest = c.responses.create(model="tiny", input="x", max_output_tokens=2)
    big = "hello " * 500  # 3000 bytes: six of them overflow the store's 16000
    latest = [c.responses.create(model="tiny", input=big, max_output_tokens=2)
              for _ in range(6)]
    with pytest.raises(openai.NotFoundError, match="evicted"):
        c.responses.create(model="tiny", input="x", previous_response_id=oldest.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(oldest.id)
    assert c.responses.retrieve(latest[-1].id).id == latest[-1].id
    c.responses.delete(latest[-1].id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(latest[-1].id)


def test_an_unsupported_field_is_a_400_naming_it(tiny):
    with pytest.raises(openai.BadRequestError, match="reasoning"):
        client(tiny).responses.create(model="tiny", input="x", reasoning={"effort": "high"})
