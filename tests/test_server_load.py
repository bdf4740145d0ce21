"""A 300-request soak on `serve` from 16 clients, of random lengths, with clients hanging up at
random: every request completes or
stops, /health answers throughout, and memory stays within the model plus the prompt-cache
budget (the prefix store's memory tier), + 10%. The budget is far smaller than the blocks the
requests leave, so the store must evict from memory. (The numbers come from
benchmarks/serve_load.py, which the README quotes.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from server_helpers import Server, tiny_v3_mixtral

# --prompt-cache-bytes: a few hundred blocks of 8 tokens (512 bytes each, the tiny model's keys
# and values per token), against the many more the soak leaves.
BUDGET = 2**20


def load_script():
    path = Path(__file__).parent.parent / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_with_disconnects_stays_healthy_and_bounded(tmp_path):
    script = load_script()
    # (the memory tier a quarter of BUDGET: the short prompts' distinct blocks outgrow it)
    server = Server("--cache-ram", str(BUDGET // 4), "--max-queue", "64",
                    "--decode-concurrency", "8", "--cache-block", "8",  # (short prompts)
                    model=str(tiny_v3_mixtral(tmp_path / "tiny")))
    try:
        script.run(server.url, requests=16, concurrency=4, max_tokens=8)  # warm: caches full
        result = script.run(server.url, requests=300, concurrency=16, disconnect=0.25,
                            max_tokens=(1, 12))
        health = server.health()
    finally:
        server.stop()
    assert result.failed == 0, result.errors
    assert result.completed + result.disconnected == 300 and result.disconnected > 30
    assert result.health_polls > 10 and result.health_failures == 0
    assert result.resident_peak <= 1.1 * (result.resident_start + BUDGET)
    assert health["memory"]["prompt_cache"] <= BUDGET
    assert health["memory"]["prompt_cache_evicted"] >= 20, health["memory"]
    assert health["queue"]["running"] == 0 and health["queue"]["waiting"] == 0


def test_a_full_queue_answers_503(tmp_path):
    import threading

    import httpx

    server = Server("--max-queue", "1", model=str(tiny_v3_mixtral(tmp_path / "tiny")))
    try:
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "max_tokens": 400, "temperature": 1.0,
                "messages": [{"role": "user", "content": "go on"}]}
        first = threading.Thread(target=httpx.post, args=(server.url + "/v1/chat/completions",),
                                 kwargs={"json": body, "timeout": 120})
        first.start()
        import time

        deadline = time.monotonic() + 30
        while not server.health()["queue"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
        first.join()
    finally:
        server.stop()
