"""Tool calls: prompts token-exact with mistral-common (v3), and a model's `[TOOL_CALLS]` output
returned as OpenAI `tool_calls` and Ollama `tool_calls`, read by the official clients."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import ollama
import openai
import pytest
from fastapi.testclient import TestClient
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from server_helpers import V3_TOKENIZER

from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.model.packing import Packed
from mlx_mixtral.server.cache_pool import CachePool
from mlx_mixtral.server.http_app import create_app
from mlx_mixtral.server.service import Service
from mlx_mixtral.server.worker import Worker
from mlx_mixtral.text.tokenizer import SentencePieceTokenizer
from mlx_mixtral.text.tools import mistral_v3_tool_ids

OURS = SentencePieceTokenizer(V3_TOKENIZER)
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def _reference(messages, tools):
    tokenizer = MistralTokenizer.from_file(str(V3_TOKENIZER))
    request = ChatCompletionRequest(messages=messages, tools=tools)
    return tokenizer.encode_chat_completion(request).tokens


@pytest.mark.parametrize("with_system", [False, True])
def test_tool_conversation_is_token_exact_with_mistral_common(with_system):
    call = ToolCall(id="abcDEF123", function=FunctionCall(name="get_weather",
                                                          arguments='{"city": "Paris"}'))
    reference = [UserMessage(content="Weather in Paris?"),
                 AssistantMessage(tool_calls=[call]),
                 ToolMessage(tool_call_id="abcDEF123", content='{"temp": 21}'),
                 AssistantMessage(content="It is 21 degrees."),
                 UserMessage(content="And in London?")]
    ours = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abcDEF123", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
            {"role": "user", "content": "And in London?"}]
    if with_system:
        reference.insert(0, SystemMessage(content="Be brief."))
        ours.insert(0, {"role": "system", "content": "Be brief."})
    expected = _reference(reference, [Tool(function=Function(**WEATHER))])
    assert mistral_v3_tool_ids(OURS, ours, [{"type": "function", "function": WEATHER}]) \
        == expected
    assert OURS.token_id("[AVAILABLE_TOOLS]") in expected  # the tools really are in it


def test_tool_results_after_the_last_user_message_are_token_exact():
    call = ToolCall(id="xyz987ABC", function=FunctionCall(name="get_weather",
                                                          arguments='{"city": "Rome"}'))
    reference = [UserMessage(content="Rome?"), AssistantMessage(tool_calls=[call]),
                 ToolMessage(tool_call_id="xyz987ABC", content="sunny")]
    ours = [{"role": "user", "content": "Rome?"},
            {"role": "assistant", "tool_calls": [
                {"id": "xyz987ABC", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "xyz987ABC", "content": "sunny"}]
    expected = _reference(reference, [Tool(function=Function(**WEATHER))])
    assert mistral_v3_tool_ids(OURS, ours, [{"type": "function", "function": WEATHER}]) \
        == expected


class Scripted:
    """A stand-in model that writes `script` after a prompt of `prompt_length` tokens,
    whatever the prompt says: how a real v3 model answers with a tool call."""

    def __init__(self, script: list[int], vocab: int) -> None:
        self.script, self.prompt_length = script, 0
        self.args = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096,
                                    head_dim=64, is_moe=False)

    def make_cache(self, slack: int = 0) -> list:
        from mlx_lm.models.cache import KVCache

        return [KVCache()]

    def parameters(self) -> dict:
        return {}

    def __call__(self, inputs: mx.array, cache, **_) -> mx.array:
        if isinstance(cache, Packed):  # the server's batch: each sequence's last row
            return mx.concatenate([self._rows(c, n)[-1:] for n, c in
                                   zip(cache.lengths, cache.caches, strict=True)])[None]
        return self._rows(cache, inputs.shape[1])[None]

    def _rows(self, cache: list, length: int) -> mx.array:
        start = cache[0].offset
        cache[0].update_and_fetch(mx.zeros((1, 1, length, 1)), mx.zeros((1, 1, length, 1)))
        rows = []
        for p in range(start, start + length):
            at = min(max(p + 1 - self.prompt_length, 0), len(self.script) - 1)
            rows.append(mx.where(mx.arange(self.args.vocab_size) == self.script[at], 10.0, 0.0))
        return mx.stack(rows)


@pytest.fixture
def scripted_client():
    answer = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    script = [OURS.token_id("[TOOL_CALLS]"), *OURS.encode(answer), OURS.eos_id]
    model = Scripted(script, OURS.vocab_size)
    worker = Worker(lambda: (model, OURS), CachePool(10**6), 4)
    worker.ready()
    service = Service(model, OURS, "scripted", worker, SamplingParams(temperature=0))
    http = TestClient(create_app(service))
    yield model, openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
    worker.stop()


@pytest.fixture
def scripted_ollama(scripted_client):
    model, c = scripted_client
    client = ollama.Client(host="http://testserver")
    client._client = c._client  # the official client's calls, over the in-process app
    return model, client


def test_tool_calls_output_comes_back_as_tool_calls(scripted_client):
    model, c = scripted_client
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": WEATHER}]
    model.prompt_length = len(mistral_v3_tool_ids(OURS, messages, tools))
    reply = c.chat.completions.create(model="scripted", messages=messages, tools=tools)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert len(call.id) == 9 and call.id.isalnum()
    chunks = list(c.chat.completions.create(model="scripted", messages=messages, tools=tools,
                                            stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    (streamed,) = [d.tool_calls for d in deltas if d.tool_calls]
    assert streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments) == {"city": "Paris"}
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_ollama_tool_calls_stream_as_calls_not_text(scripted_ollama):
    model, c = scripted_ollama
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": WEATHER}]
    model.prompt_length = len(mistral_v3_tool_ids(OURS, messages, tools))
    whole = c.chat(model="scripted", messages=messages, tools=tools)
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(c.chat(model="scripted", messages=messages, tools=tools, stream=True))
    assert "".join(p.message.content or "" for p in parts) == ""  # no call JSON as text
    (streamed,) = parts[-1].message.tool_calls
    assert streamed.function.arguments == {"city": "Paris"} and parts[-1].done
