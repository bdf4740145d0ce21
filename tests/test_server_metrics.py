"""What `serve` says about itself: `/metrics` (read with prometheus_client's own parser) and each
reply's `timings`, checked against the usage the official openai and ollama clients got; and
budgets that hold: under `--max-memory`, the model, the running request's KV cache and the
prompt-cache pool together stay within it."""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from server_helpers import (
    Server,
    free_port,
    paged_mixtral,
    peak_rss,
    scrape,
    serve_tiny_v3,
)

from mlx_mixtral.loading import describe
from mlx_mixtral.loading.memory import load_bytes
from mlx_mixtral.loading.memory_plan import OVERHEAD

KEY = "sesame"  # the API key of the `tiny` server
HI = [{"role": "user", "content": "Say something."}]


def check_timings(timings: dict, usage) -> None:
    """llama.cpp's timings agree with OpenAI's usage."""
    cached = usage.prompt_tokens_details.cached_tokens
    assert timings["predicted_n"] == usage.completion_tokens
    assert timings["cache_n"] == cached
    assert timings["prompt_n"] + timings["cache_n"] == usage.prompt_tokens
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] >= 0
    if timings["predicted_ms"] > 0:
        assert timings["predicted_per_second"] == pytest.approx(
            timings["predicted_n"] * 1e3 / timings["predicted_ms"])
    assert timings["prompt_per_second"] == pytest.approx(
        timings["prompt_n"] * 1e3 / timings["prompt_ms"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from serve_tiny_v3(tmp_path_factory, "--api-key", KEY, "--max-tokens", "6")


def test_metrics_add_up_to_what_the_clients_got(tiny):
    assert httpx.get(tiny.url + "/metrics").status_code == 401  # the API key guards it
    c = openai.OpenAI(base_url=tiny.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    # First, so that nothing is cached for it (Ollama's reply does not say what was).
    o = ollama.Client(host=tiny.url, headers={"Authorization": f"Bearer {KEY}"})
    said = o.generate(model=model, prompt="Hello", options={"num_predict": 5})
    usages, replies = [], 1
    for turn in range(2):  # the second turn of each takes the first one's cache
        r = c.chat.completions.create(model=model, messages=HI, seed=turn)
        check_timings(r.model_extra["timings"], r.usage)
        usages.append(r.usage)
        chunks = list(c.chat.completions.create(
            model=model, messages=HI + [{"role": "user", "content": f"Turn {turn}."}],
            stream=True, stream_options={"include_usage": True}))
        finish = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
        assert finish.model_extra["timings"] == chunks[-1].model_extra["timings"]
        check_timings(chunks[-1].model_extra["timings"], chunks[-1].usage)
        usages.append(chunks[-1].usage)
        r = c.completions.create(model=model, prompt=f"Once upon a time {turn}",
                                 max_tokens=4)
        check_timings(r.model_extra["timings"], r.usage)
        usages.append(r.usage)
        replies += 3
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=HI)

    m = scrape(tiny, KEY)
    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages) + said.eval_count
    assert cached > 0
    assert m["mlx_mixtral_prompt_cache_hit_tokens_total"] == cached
    assert m["mlx_mixtral_prompt_tokens_total"] == prompt - cached + said.prompt_eval_count
    assert m["mlx_mixtral_generated_tokens_total"] == generated
    assert m["mlx_mixtral_time_to_first_token_seconds_count"] == replies
    assert sum(v for k, v in m.items() if k.startswith("mlx_mixtral_replies_total")) == replies
    assert 0 < m["mlx_mixtral_inter_token_latency_seconds_count"] <= generated - replies
    assert m["mlx_mixtral_prompt_seconds_total"] > 0
    assert m["mlx_mixtral_generated_seconds_total"] > 0
    requests = {k: v for k, v in m.items() if k.startswith("mlx_mixtral_requests_total")}
    assert requests["mlx_mixtral_requests_total{endpoint=/v1/chat/completions,status=200}"] == 4
    assert requests["mlx_mixtral_requests_total{endpoint=/v1/chat/completions,status=404}"] == 1
    assert requests["mlx_mixtral_requests_total{endpoint=/v1/completions,status=200}"] == 2
    assert requests["mlx_mixtral_requests_total{endpoint=/api/generate,status=200}"] == 1
    assert requests["mlx_mixtral_requests_total{endpoint=/metrics,status=401}"] == 1
    assert m["mlx_mixtral_requests_running"] == 0 and m["mlx_mixtral_requests_waiting"] == 0
    # Ollama's durations are the same timings, in nanoseconds.
    assert said.eval_duration > 0 and said.prompt_eval_duration > 0


def test_health_shows_the_occupancy(tiny):
    queue = tiny.health()["queue"]
    assert {"running", "waiting", "capacity", "max", "served"} <= set(queue)
    assert queue["running"] <= queue["capacity"]


# ---- budgets ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    folder = paged_mixtral(tmp_path_factory.mktemp("paged"))
    return folder, OVERHEAD + int(0.4 * load_bytes(describe(folder)))


def prompts(n: int) -> list[str]:
    """Distinct prompts of 41 words (tokens)."""
    rng = random.Random(0)
    return [" ".join(f"t{rng.randrange(3, 128)}" for _ in range(40)) + f" t{3 + i % 120}"
            for i in range(n)]


@pytest.mark.slow
def test_budget_holds_for_model_requests_and_pool(paged):
    """40% of the model's size, 24 distinct prompts from 4 clients (their blocks are more
    than the store's memory tier holds: it must evict): MLX's peak and the growth
    of the process's peak resident memory stay within the budget + 5%, and the prompt-cache
    pool, carved out of the budget, had to evict."""
    folder, budget = paged
    server = Server("--max-memory", str(budget), "--max-tokens", "4", "--cache-block", "8",
                    model=str(folder))
    try:
        idle, _ = peak_rss(server.proc.pid)

        def ask(prompt: str) -> int:
            return httpx.post(server.url + "/v1/completions", timeout=300, json={
                "model": "q4", "prompt": prompt, "max_tokens": 4}).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(ask, prompts(24)))
        health = server.health()
        _, peak = peak_rss(server.proc.pid)
        m = scrape(server, None)
    finally:
        server.stop()
    print(f"budget {budget}, MLX peak {health['memory']['mlx_peak']}, resident idle {idle} "
          f"peak {peak}, pool {health['memory']['prompt_cache']} of "
          f"{health['memory']['prompt_cache_budget']}, {health['memory']['prompt_cache_evicted']} "
          "evicted")
    assert statuses == [200] * 24
    memory = health["memory"]
    assert memory["mlx_peak"] <= 1.05 * budget, (memory, budget)
    assert peak - idle <= 1.05 * budget, (peak, idle, budget)
    assert 0 < memory["prompt_cache_budget"] < budget
    assert memory["prompt_cache_evicted"] > 0
    assert m["mlx_mixtral_prompt_cache_evictions_total"] == memory["prompt_cache_evicted"]
    assert 0 < m["mlx_mixtral_expert_cache_hits_total"] < m["mlx_mixtral_expert_cache_needed_total"]
    assert m["mlx_mixtral_expert_read_bytes_total"] > 0


@pytest.mark.parametrize("flag", ["--cache-ram", "--prompt-cache-bytes"])  # (its old name)
def test_a_prompt_cache_that_does_not_fit_is_refused(paged, flag):
    folder, budget = paged
    r = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model",
                        str(folder), "--port", str(free_port()), "--max-memory", str(budget),
                        flag, "2GB"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert flag in lines[0] and "--max-memory" in lines[0], lines[0]
