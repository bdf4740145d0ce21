"""schemathesis against the server's own OpenAPI schema: no 500, no response that breaks the
schema, on a random tiny Mixtral served in-process. The bodies name the served model, so the
generation routes run the model; their successful replies must parse as the official openai
and ollama clients' own response types, and some of them must have succeeded."""

from __future__ import annotations

import json
from collections import Counter

import ollama
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from server_helpers import tiny_v3_mixtral

from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.loading import load
from mlx_mixtral.server.cache_pool import CachePool
from mlx_mixtral.server.http_app import create_app
from mlx_mixtral.server.service import Service
from mlx_mixtral.server.worker import Worker

MODEL = "tiny"
# Each generation route's reply type, whole and streamed (a stream's every piece).
REPLIES = {"/v1/chat/completions": (ChatCompletion, ChatCompletionChunk),
           "/v1/completions": (Completion, Completion),
           "/api/chat": (ollama.ChatResponse, ollama.ChatResponse),
           "/api/generate": (ollama.GenerateResponse, ollama.GenerateResponse)}
REACHED: Counter = Counter()  # generation requests answered 200, by route


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tiny_v3_mixtral(tmp_path_factory.mktemp("fuzz-v3"))
    worker = Worker(lambda: load(folder), CachePool(32 * 2**20), 8)
    model, tokenizer = worker.ready()
    # Short replies: the fuzzer asks for any max_tokens, and the test is about the API.
    defaults = SamplingParams(max_tokens=4)
    service = Service(model, tokenizer, MODEL, worker, defaults)
    yield create_app(service)
    worker.stop()
    ran = sum(REACHED.values())
    assert ran == 0 or REACHED["200"] > 0, f"no generation request succeeded: {REACHED}"


@pytest.fixture(scope="module")
def api_schema(app):
    # The coverage phase's ~1,000 boundary bodies each run the model now; the examples and
    # the fuzzing phase keep the test within a minute or two.
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


def pieces(response) -> list[dict]:
    """A reply's JSON objects: the whole body, or each event of an SSE or NDJSON stream."""
    text = response.content.decode()
    kind = response.headers.get("content-type", [""])
    kind = kind[0] if isinstance(kind, list) else kind
    if kind.startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        return [json.loads(d) for d in data if d != "[DONE]"]
    if kind.startswith("application/x-ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [json.loads(text)]


def check_reply(path: str, response) -> None:
    whole, piece = REPLIES[path]
    objects = pieces(response)
    kind = whole if len(objects) == 1 and "chunk" not in str(objects[0].get("object")) else piece
    for obj in objects:
        if path.startswith("/v1/") and not obj.get("choices") and "usage" in obj:
            continue  # the usage chunk of a stream: no choices
        if kind is Completion and len(objects) > 1:  # OpenAI streams Completions whose
            obj = {**obj, "choices": [  # finish_reason is null until the last
                {**c, "finish_reason": c["finish_reason"] or "length"} for c in obj["choices"]]}
        kind.model_validate(obj)


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_no_schema_violations(case):
    if isinstance(case.body, dict):
        if "model" in case.body:
            case.body["model"] = MODEL  # the served model: the fuzzer reaches generation
        options = case.body.get("options")
        options = options if isinstance(options, dict) else {}
        for where, name in ((case.body, "max_tokens"), (case.body, "max_completion_tokens"),
                            (options, "num_predict")):
            if _number(where.get(name)) > 4:  # Pydantic also takes 1e9 and "999" for ints
                where[name] = 4
    # Schema-valid requests may still be refused for what a schema cannot say (a tool
    # result's call id): a 4xx for those is right, a 500 never is. Pydantic's lax mode takes
    # what clients send loosely (0 for false, "1" for 1), which the negative check calls
    # accepting invalid data.
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance,
                                                       negative_data_rejection])
    path = case.operation.path
    if path in REPLIES:
        REACHED[str(response.status_code)] += 1
        if response.status_code == 200:
            check_reply(path, response)
