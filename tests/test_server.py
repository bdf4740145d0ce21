"""`mlx-mixtral serve` driven by the official `openai` and `ollama` Python clients, over a real
process on a free loopback port: the demo model (real text) and a random tiny Mixtral with the
Mistral v3 tokenizer (garbage text, real formats)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import ollama
import openai
import pytest
from server_helpers import TEST_BLOCK, Server, scrape, serve_tiny_v3

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo():
    server = Server("--temp", "0", "--prompt-cache-bytes", "64MB", "--max-queue", "16",
                    "--cache-block", str(TEST_BLOCK))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from serve_tiny_v3(tmp_path_factory, "--api-key", "sesame", "--max-tokens", "24")


def client(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


# ---- OpenAI ---------------------------------------------------------------------------------

def test_chat_answers_and_streams_the_same(demo):
    c = client(demo)
    reply = c.chat.completions.create(model="demo", messages=FRANCE, max_tokens=20)
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model="demo", messages=FRANCE, max_tokens=20,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_models_lists_the_served_model(demo):
    assert [m.id for m in client(demo).models.list().data] == ["demo"]


def test_completion_with_stop_string(demo):
    c = client(demo)
    prompt = "Monday, Tuesday, Wednesday,"
    # (6 tokens hold the reply's second word, where the stop is cut)
    whole = c.completions.create(model="demo", prompt=prompt, max_tokens=6).choices[0].text
    stop = whole.strip().split()[1]  # the reply's second word
    cut = c.completions.create(model="demo", prompt=prompt, max_tokens=6,
                               stop=["@@@", stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == whole[:whole.index(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="demo", prompt=prompt, max_tokens=6, stop=stop, stream=True) if ch.choices)
    assert streamed == cut.text


def test_seeds_reproduce(demo):
    c = client(demo)

    def sample(seed: int) -> str:  # (seeds 7, 8 and 9 part by the second token)
        return c.chat.completions.create(model="demo", messages=[
            {"role": "user", "content": "Write a short poem about the sea."}],
            temperature=1.0, seed=seed, max_tokens=6).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9))


def test_logprobs(demo):
    reply = client(demo).chat.completions.create(model="demo", messages=FRANCE, max_tokens=6,
                                                 logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy (the server's --temp 0): the chosen token is the likeliest
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert sum(2.718281828 ** x.logprob for x in t.top_logprobs) <= 1.0 + 1e-4


def test_second_turn_prefills_only_what_is_new(demo):
    from mlx_mixtral.loading import load

    c = client(demo)
    turn = [{"role": "user", "content": "Name a large animal that lives in the sea."}]
    first = c.chat.completions.create(model="demo", messages=turn, max_tokens=6)
    history = [*turn, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And a small one?"}]
    second = c.chat.completions.create(model="demo", messages=history, max_tokens=1)
    # The oracle: the prompts as the model's own chat template tokenizes them.
    _, tokenizer = load("demo", tokenizer=True)
    asked = tokenizer.apply_chat_template(turn)  # turn one's prompt
    whole = tokenizer.apply_chat_template(history)
    assert second.usage.prompt_tokens == len(whole)
    prefilled = second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens
    # Turn one's prompt and its reply came from the store, in whole blocks: only the new
    # message (and the rest of a block) was read.
    assert prefilled <= len(whole) - len(asked) - len(tokenizer.encode(
        first.choices[0].message.content)) + 2 + TEST_BLOCK - 1
    assert prefilled >= len(tokenizer.encode(history[2]["content"]))


def test_eight_concurrent_streams_are_not_interleaved(demo):
    c = client(demo)
    prompts = [f"Count from {i} to {i + 5}." for i in range(8)]
    # (prompts 0 and 1 part from the first token: 5 tokens show a stream that got another's)
    alone = {p: c.chat.completions.create(model="demo", max_tokens=5, messages=[
        {"role": "user", "content": p}]).choices[0].message.content for p in prompts[:2]}
    results: dict[str, str] = {}

    def run(p: str) -> None:
        stream = client(demo).chat.completions.create(
            model="demo", max_tokens=5, stream=True, messages=[{"role": "user", "content": p}])
        results[p] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 8 and all(results.values())
    for p, text in alone.items():
        assert results[p] == text  # each stream got its own reply, whole and in order
    # The last job is released just after its client has read the end of its stream.
    deadline = time.monotonic() + 10
    while demo.health()["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert demo.health()["queue"]["running"] == 0


def test_a_client_that_leaves_stops_its_generation(tiny):
    """A reply that cannot end by itself soon (random weights rarely say EOS; 1,000 tokens) is
    hung up on after its first token: its job stops within a few tokens. Counted, not timed:
    the server's own token count and replies that ended by themselves (/metrics)."""
    key = {"Authorization": "Bearer sesame"}
    before, served = scrape(tiny, "sesame"), tiny.health()["queue"]["served"]
    with httpx.stream("POST", tiny.url + "/v1/chat/completions", timeout=60, headers=key,
                      json={"model": tiny_model(tiny), "messages": FRANCE, "max_tokens": 1000,
                            "stream": True, "temperature": 1.0, "seed": 1}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": ""' not in line:
                break  # a token came: hang up
    deadline = time.monotonic() + 300  # only a stuck job takes this long
    while time.monotonic() < deadline:
        h = tiny.health()
        if h["queue"]["served"] > served and not h["queue"]["running"]:
            break
        time.sleep(0.2)
    after = scrape(tiny, "sesame")

    def ended(m: dict) -> float:
        return sum(v for k, v in m.items() if k.startswith("mlx_mixtral_replies_total"))

    generated = after["mlx_mixtral_generated_tokens_total"] - \
        before["mlx_mixtral_generated_tokens_total"]
    assert 1 <= generated <= 50, f"{generated} tokens were generated after the hang-up"
    assert ended(after) == ended(before), "the reply ended by itself: the test proves nothing"


def tiny_model(server: Server) -> str:
    return client(server, "sesame").models.list().data[0].id


# ---- Ollama ---------------------------------------------------------------------------------

def test_ollama_chat_streams_and_lists(demo):
    o = ollama.Client(host=demo.url)
    parts = list(o.chat(model="demo", messages=FRANCE, stream=True,
                        options={"num_predict": 20}))
    text = "".join(p.message.content for p in parts)
    assert "Paris" in text and parts[-1].done and parts[-1].eval_count > 0
    assert o.chat(model="demo", messages=FRANCE, options={"num_predict": 20}).message.content \
        == text
    assert [m.model for m in o.list().models] == ["demo"]
    assert o.generate(model="demo", prompt="What is the capital of France?",
                      options={"num_predict": 20}).response == text
    # Described as `list` and `info` describe it (loading/summary.py).
    from mlx_mixtral.catalog.local import demo_models
    from mlx_mixtral.catalog.summary import summarize
    from mlx_mixtral.loading import describe, resolve

    summary, (listed,) = summarize(describe(resolve("demo"))), demo_models()
    (tag,) = o.list().models
    assert tag.size == listed.disk_bytes == summary.disk_bytes
    shown = o.show("demo")
    assert (shown.details.family, shown.details.parameter_size) == ("llama", "135M")
    assert shown.modelinfo["general.parameter_count"] == summary.parameters
    with pytest.raises(ollama.ResponseError):
        o.chat(model="nope", messages=FRANCE)



def test_ollama_describes_the_model_as_it_is(demo, tiny):
    """Issue 27 finding 17: the dense SmolLM2 was "family": "mistral" with
    "llama.expert_count": 8. The oracle: the demo GGUF's general.architecture (llama, as
    llama.cpp reads it; the gguf package takes 6 s to parse it here), and the Mixtral
    folder's config.json."""
    arch = "llama"
    shown = ollama.Client(host=demo.url).show("demo")
    (tag,) = ollama.Client(host=demo.url).list().models
    assert shown.details.family == tag.details.family == arch == "llama"
    assert shown.modelinfo["general.architecture"] == arch
    assert shown.modelinfo[f"{arch}.block_count"] == 30
    assert not [k for k in shown.modelinfo if "expert" in k], shown.modelinfo

    config = json.loads((tiny.folder / "config.json").read_text())
    moe = ollama.Client(host=tiny.url, headers={"Authorization": "Bearer sesame"}).show(
        tiny.folder.name)
    assert moe.details.family == moe.modelinfo["general.architecture"] == config["model_type"]
    assert moe.modelinfo["mixtral.expert_count"] == config["num_local_experts"]
    assert moe.modelinfo["mixtral.expert_used_count"] == config["num_experts_per_tok"]

# ---- structured output ------------------------------------------------------------------------

# Short strings and few items: each reply is a few tokens of choice among the forced ones (the
# demo decodes about 8 tokens a second here); nesting, enums, arrays and bounds stay.
SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False,
               "required": ["name", "address"],
               "properties": {"name": {"type": "string", "maxLength": 4},
                              "address": {"type": "object", "additionalProperties": False,
                                          "required": ["city", "zip"],
                                          "properties": {
                                              "city": {"type": "string", "maxLength": 4},
                                              "zip": {"type": "integer", "minimum": 0,
                                                      "maximum": 99}}}}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["mood", "ok"],
             "properties": {"mood": {"enum": ["happy", "sad", "calm"]},
                            "ok": {"type": "boolean"}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["tags"],
              "properties": {"tags": {"type": "array", "maxItems": 2, "items": {
                  "type": "string", "maxLength": 4}}}},
}


def _structured(server: Server, model: str, key: str, schema: dict, seed: int) -> str:
    reply = client(server, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        temperature=1.0, seed=seed, max_tokens=80,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "out", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    return reply.choices[0].message.content


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_validates_on_the_demo(demo, name):
    for seed in range(20):
        jsonschema.validate(json.loads(_structured(demo, "demo", "unused", SCHEMAS[name], seed)),
                            SCHEMAS[name])


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_validates_on_random_weights(tiny, name):
    model = client(tiny, "sesame").models.list().data[0].id
    for seed in range(20):
        jsonschema.validate(json.loads(_structured(tiny, model, "sesame", SCHEMAS[name],
                                                   seed)), SCHEMAS[name])


def test_json_object_mode_and_ollama_format(demo):
    reply = client(demo).chat.completions.create(
        model="demo", max_tokens=60, response_format={"type": "json_object"}, temperature=0,
        # (the demo's default repetition penalty pushes it off repeated quotes: garbage keys)
        extra_body={"repetition_penalty": 1.0},
        messages=[{"role": "user", "content": 'Give a JSON object with one key "name" for a '
                   "cat."}])
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    o = ollama.Client(host=demo.url)
    out = o.chat(model="demo", messages=[{"role": "user", "content": "Feeling?"}],
                 format=SCHEMAS["enum"], options={"num_predict": 40})
    jsonschema.validate(json.loads(out.message.content), SCHEMAS["enum"])


# ---- API key, tools, bad requests ------------------------------------------------------------

def test_api_key_is_required_but_not_for_health(tiny):
    with pytest.raises(openai.AuthenticationError):
        client(tiny, "wrong").models.list()
    assert httpx.get(tiny.url + "/v1/models").status_code == 401
    assert httpx.get(tiny.url + "/health").status_code == 200
    assert client(tiny, "sesame").models.list().data


def test_tool_conversation_runs_on_a_v3_model(tiny):
    c = client(tiny, "sesame")
    model = c.models.list().data[0].id
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abcDEF123", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'}]
    reply = c.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_on_a_model_that_cannot_call_them_is_a_400(demo):
    with pytest.raises(openai.BadRequestError, match="cannot call tools"):
        client(demo).chat.completions.create(model="demo", messages=FRANCE, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])


KEY = {"Authorization": "Bearer sesame"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "hello " * 1500  # over the tiny model's 1024-token context

# (what is wrong, method, path, headers, body: a dict for JSON or bytes, status)
BAD_REQUESTS = [
    ("malformed JSON", "POST", "/v1/chat/completions", KEY, b'{"model": ', 400),
    ("messages not a list", "POST", "/v1/chat/completions", KEY, {"messages": "hi"}, 400),
    ("messages missing", "POST", "/v1/chat/completions", KEY, {}, 400),
    ("messages empty", "POST", "/v1/chat/completions", KEY, {"messages": []}, 400),
    ("unknown role", "POST", "/v1/chat/completions", KEY,
     {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("temperature a word", "POST", "/v1/chat/completions", KEY, {**CHAT, "temperature": "hot"},
     400),
    ("temperature too high", "POST", "/v1/chat/completions", KEY, {**CHAT, "temperature": 5},
     400),
    ("max_tokens 0", "POST", "/v1/chat/completions", KEY, {**CHAT, "max_tokens": 0}, 400),
    ("n above 128", "POST", "/v1/chat/completions", KEY, {**CHAT, "n": 129}, 400),
    ("unknown model", "POST", "/v1/chat/completions", KEY, {**CHAT, "model": "gpt-9"}, 404),
    ("prompt too long", "POST", "/v1/completions", KEY, {"prompt": LONG}, 400),
    ("no API key", "POST", "/v1/chat/completions", {}, CHAT, 401),
    ("wrong API key", "POST", "/v1/chat/completions", {"Authorization": "Bearer nope"}, CHAT,
     401),
    ("oversized body", "POST", "/v1/chat/completions", KEY,
     {**CHAT, "user": "x" * 5 * 2**20}, 413),
    ("schema the grammar refuses", "POST", "/v1/chat/completions", KEY,
     {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     400),
    ("too many stop strings", "POST", "/v1/chat/completions", KEY,
     {**CHAT, "stop": [str(i) for i in range(20)]}, 400),
    ("top_logprobs too many", "POST", "/v1/chat/completions", KEY,
     {**CHAT, "logprobs": True, "top_logprobs": 50}, 400),
    ("token id outside the vocabulary", "POST", "/v1/completions", KEY, {"prompt": [99999999]},
     400),
    ("negative seed", "POST", "/v1/chat/completions", KEY, {**CHAT, "seed": -1}, 400),
    ("repetition penalty 0 in float32", "POST", "/v1/chat/completions", KEY,
     {**CHAT, "repetition_penalty": 5e-324}, 400),
    ("unknown response_format", "POST", "/v1/chat/completions", KEY,
     {**CHAT, "response_format": {"type": "xml"}}, 400),
    ("tool result without its call id", "POST", "/v1/chat/completions", KEY,
     {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}, 400),
    ("unknown path", "GET", "/v1/engines", KEY, None, 404),
    ("wrong method", "GET", "/v1/chat/completions", KEY, None, 405),
    ("Ollama: malformed JSON", "POST", "/api/chat", KEY, b"{", 400),
    ("Ollama: unknown model", "POST", "/api/generate", KEY, {"model": "nope", "prompt": "hi"},
     404),
]


@pytest.mark.parametrize("what,method,path,headers,body,status", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_the_right_status_and_an_error_object(tiny, what, method, path,
                                                               headers, body, status):
    model = httpx.get(tiny.url + "/v1/models", headers=KEY).json()["data"][0]["id"]
    if isinstance(body, dict):
        body = json.dumps({"model": model, **body}).encode()
    r = httpx.request(method, tiny.url + path, headers={**headers,
                                                        "Content-Type": "application/json"},
                      content=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and error
    else:
        assert isinstance(error["message"], str) and error["message"] and error["type"]
        assert "Traceback" not in error["message"]
    assert tiny.health()["status"] == "ok"


def test_the_server_is_well_after_the_bad_requests(tiny):
    c = client(tiny, "sesame")
    model = c.models.list().data[0].id
    reply = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


# ---- the chat app as a client ----------------------------------------------------------------

async def test_chat_app_talks_to_the_server(demo, tmp_path):
    from app_helpers import wait_until

    from mlx_mixtral.app.chat_app import ChatApp
    from mlx_mixtral.app.http_engine import HttpEngine
    from mlx_mixtral.app.store import Store
    from mlx_mixtral.app.widgets import AssistantMessage, PromptInput
    from mlx_mixtral.generation.sampling import SamplingParams

    app = ChatApp(HttpEngine(demo.url), demo.url, Store(tmp_path / "chats.db"),
                  settings=SamplingParams(temperature=0, max_tokens=20))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.info is not None)
        assert app.info.name == "demo" and demo.url in app.info.describe()
        for text in ("What is the capital of France?", "And of Italy?"):
            done = app.replies_done
            prompt = app.query_one(PromptInput)
            prompt.focus()
            prompt.text = text
            await pilot.press("enter")
            await wait_until(pilot, lambda d=done: app.replies_done > d, timeout=120)
        replies = [r.text for r in app.query(AssistantMessage)]
    assert "Paris" in replies[0] and "Rome" in replies[1]


def test_chat_server_flag_checks_its_url():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "chat", "--server", "localhost"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "URL" in r.stderr
