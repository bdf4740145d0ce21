"""No field silently ignored, and schemas applied as llama.cpp applies them, against a real
`serve` of the demo model (real text): the ollama client's `format=Model.model_json_schema()`
parses into the Pydantic model, `logit_bias`, llama.cpp's `grammar` and `json_schema`, and a 400
naming any field the server does not implement. Oracles: Pydantic, jsonschema, `re`, the
reply's own logprobs."""

from __future__ import annotations

import json
import re

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field
from server_helpers import Server

from mlx_mixtral.generation.grammar import as_llama_cpp

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class Person(BaseModel):
    name: str = Field(max_length=12)  # (a bound also in the schema Ollama's client sends)
    age: int


@pytest.fixture(scope="module")
def demo():
    server = Server("--temp", "0", "--max-tokens", "48")
    yield server
    server.stop()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_schemas_are_applied_as_llama_cpp_applies_them():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "c": {"type": "array", "items": {"properties": {"d": {}}}},
        "e": {"type": "object", "properties": {}, "additionalProperties": True}},
        "$defs": {"X": {"properties": {"y": {}}}}}
    closed = as_llama_cpp(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["e"]["additionalProperties"] is True  # said: kept
    assert closed["$defs"]["X"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left alone
    assert as_llama_cpp({"type": "integer"})["maximum"] == 10**16 - 1  # 16 digits at most
    assert as_llama_cpp({"type": "integer", "minimum": 0}) == {"type": "integer", "minimum": 0}
    both = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    jsonschema.validate({"a": 1, "b": 2}, as_llama_cpp(both))  # parts of one object


@pytest.mark.slow
def test_ollama_format_from_a_pydantic_model_parses_into_it(demo):
    o = ollama.Client(host=demo.url)
    for seed in range(10):
        out = o.chat(model="demo", messages=[{"role": "user", "content": "Describe a person."}],
                     format=Person.model_json_schema(),
                     options={"seed": seed, "temperature": 0.7, "num_predict": 64})
        assert out.done_reason == "stop", out.message.content
        assert set(json.loads(out.message.content)) == {"name", "age"}
        Person.model_validate_json(out.message.content)


def _vocabulary() -> list[str]:
    """The demo's tokens as llama.cpp's gguf package reads them (byte-level: Ġ is a space)."""
    from gguf import GGUFReader

    from mlx_mixtral.demo import demo_model_path

    field = GGUFReader(demo_model_path()).fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode() for i in field.data]


def test_logit_bias_bans_and_forces_tokens(demo):
    c = client(demo)
    vocabulary = _vocabulary()

    def first_token(**extra):
        reply = c.chat.completions.create(model="demo", messages=FRANCE, max_tokens=2,
                                          logprobs=True, top_logprobs=2, **extra)
        return reply.choices[0].logprobs.content[0]

    def token_id(text: str) -> str:
        return str(vocabulary.index(text.replace(" ", "\u0120")))

    greedy = first_token()
    banned = first_token(logit_bias={token_id(greedy.token): -100})
    assert banned.token != greedy.token and banned.token == greedy.top_logprobs[1].token
    assert first_token(logit_bias={token_id(" Lyon"): 100}).token == " Lyon"


def test_a_gbnf_grammar_is_followed(demo):
    gbnf = 'root ::= "The answer is " ("Paris" | "Lyon" | "Nice") "." [ a-z]{0,12}'
    for seed in range(3):
        reply = client(demo).chat.completions.create(
            model="demo", messages=FRANCE, temperature=1, seed=seed, max_tokens=24,
            extra_body={"grammar": gbnf})
        text = reply.choices[0].message.content
        assert re.fullmatch(r"The answer is (Paris|Lyon|Nice)\.[ a-z]{0,12}", text), text


def test_llama_cpp_json_schema_and_json_object_schema_fields(demo):
    schema = {"type": "object", "required": ["city"],
              "properties": {"city": {"enum": ["Paris", "Lyon"]}}}
    c = client(demo)
    for extra in ({"json_schema": schema},
                  {"response_format": {"type": "json_object", "schema": schema}}):
        reply = c.chat.completions.create(model="demo", messages=FRANCE, max_tokens=24,
                                          extra_body=extra)
        assert json.loads(reply.choices[0].message.content) == {"city": "Paris"}, extra


BAD = [("invalid GBNF", {"grammar": 'root ::= "yes'}, "grammar"),
       ("GBNF without root", {"grammar": 'x ::= "a"'}, "grammar"),
       ("unknown field", {"mirostat": 2}, "mirostat"),
       ("grammar and json_schema", {"grammar": 'root ::= "a"', "json_schema": {}},
        "json_schema")]


@pytest.mark.parametrize("what,extra,named", BAD, ids=[b[0] for b in BAD])
def test_fields_it_cannot_honor_are_a_400_naming_them(demo, what, extra, named):
    with pytest.raises(openai.BadRequestError) as caught:
        client(demo).chat.completions.create(model="demo", messages=FRANCE, max_tokens=2,
                                             extra_body=extra)
    assert caught.value.body["param"] == named and named in caught.value.body["message"]


def test_harmless_fields_pass_and_models_answer_by_id(demo):
    c = client(demo)
    reply = c.chat.completions.create(model="demo", messages=FRANCE, max_tokens=2, user="me",
                                      metadata={"a": "b"}, store=False, service_tier="auto")
    assert reply.choices[0].message.content
    assert c.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-9")
