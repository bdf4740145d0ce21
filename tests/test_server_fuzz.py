"""schemathesis against the server's own OpenAPI schema: no 500, no response that breaks the
schema, on a random tiny Mixtral served in-process."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from server_helpers import tiny_v3_mixtral

from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.loading import load
from mlx_mixtral.server.cache_pool import CachePool
from mlx_mixtral.server.http_app import create_app
from mlx_mixtral.server.service import Service
from mlx_mixtral.server.worker import Worker


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tiny_v3_mixtral(tmp_path_factory.mktemp("fuzz-v3"))
    worker = Worker(lambda: load(folder), CachePool(32 * 2**20), 8)
    model, tokenizer = worker.ready()
    # Short replies: the fuzzer asks for any max_tokens, and the test is about the API.
    defaults = SamplingParams(max_tokens=4)
    service = Service(model, tokenizer, "tiny", worker, defaults)
    yield create_app(service)
    worker.stop()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_no_schema_violations(case):
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = min(case.body["max_tokens"], 4)
    # Schema-valid requests may still be refused for what a schema cannot say (the model's
    # name, a tool result's call id): a 4xx for those is right, a 500 never is.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
