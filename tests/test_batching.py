"""Continuous batching (generation/scheduler.py): a sequence's tokens do not depend on what runs
beside it, the batch saves forward passes, a long prompt never freezes the others, and the
server's answers (the official openai client) are the same cold or warm, valid under a schema
in a batch, and come as n choices.

The oracles: `stream_generate` (mlx-lm's `generate_step`) for the same prompt alone, counted
model calls (a wrapper around the model's class, not the scheduler's own counter), jsonschema.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf

from mlx_mixtral.generation.grammar import GrammarMask, json_grammar
from mlx_mixtral.generation.kv import KVSettings
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.scheduler import Request, Scheduler
from mlx_mixtral.generation.stats import Stats
from mlx_mixtral.generation.stream import stream_generate
from mlx_mixtral.loading import load
from mlx_mixtral.model.decoder import Model
from mlx_mixtral.server.cache_pool import CachePool

WINDOW = 16
STEP = 32  # prefill tokens per pass
SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A windowed tiny Mistral with the real v3 tokenizer (llguidance needs a real one)."""
    import shutil

    from server_helpers import V3_TOKENIZER

    folder = tmp_path_factory.mktemp("windowed")
    build_hf(folder, "mistral", sliding_window=WINDOW, max_position_embeddings=4096,
             vocab_size=32768, num_attention_heads=2, num_key_value_heads=1)  # head_dim 32
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model")
    return load(folder)


class Calls:
    """Counts the model's forward passes (and what each one held), whatever calls them."""

    def __init__(self, monkeypatch) -> None:
        self.lengths: list[list[int]] = []
        original = Model.__call__

        def counted(model, inputs, cache=None, **kw):
            self.lengths.append(list(getattr(cache, "lengths", [inputs.shape[1]])))
            return original(model, inputs, cache=cache, **kw)

        monkeypatch.setattr(Model, "__call__", counted)


def prompt(n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).randint(1000, 32000, n).tolist()


def alone(model, tok, ids, params, kv=None, grammar=None):
    """The oracle: mlx-lm's token loop over the same prompt, nothing beside it."""
    processors = [GrammarMask(tok, model.args.vocab_size, grammar, len(ids))] if grammar else []
    for item in stream_generate(model, tok, ids, sampling=params, kv=kv, prefill_step_size=STEP,
                                processors=processors, logprobs=0):
        if isinstance(item, Stats):
            return item.tokens


class Replies:
    """What a scheduler's requests heard: tokens and logprobs per (request, choice)."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[int, int], list[int]] = {}
        self.logprobs: dict[tuple[int, int], list[float]] = {}
        self.ends: dict[tuple[int, int], Stats] = {}

    def emit(self, key: int):
        def hear(item):
            where = (key, item.index)
            if isinstance(item, Stats):
                self.ends[where] = item
            elif item.token is not None:
                self.tokens.setdefault(where, []).append(item.token)
                self.logprobs.setdefault(where, []).append(item.logprob)
        return hear


def run(scheduler: Scheduler, on_step=None) -> None:
    while scheduler.step():
        if on_step is not None:
            on_step()


@pytest.mark.parametrize("bits", [None, 8])
def test_eight_requests_together_give_what_each_gives_alone(tiny, bits):
    """Different prompt lengths (most past the window), a pooled cache continued (with a
    penalty: it must see the cached prompt too), a JSON schema, a repetition penalty: token for
    token what mlx-lm's loop gives each prompt alone, and what each gives alone on the
    scheduler."""
    model, tok = tiny
    kv = KVSettings(bits=bits, group_size=32)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    pool = CachePool()
    grammar = json_grammar(SCHEMA, tok, model.args.vocab_size)
    lengths = (3, 9, 40, 70, 5, 25, 12, 30)
    prompts = [prompt(n, seed) for seed, n in enumerate(lengths)]
    params = [greedy] * 8
    params[4] = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5)
    params[6] = SamplingParams(temperature=0, max_tokens=24, frequency_penalty=1.5)
    grammars = [None] * 8
    grammars[5] = grammar
    # The pooled one: its first turn runs first, its second continues that cache.
    first = Scheduler(model, tok, kv=kv, prefill_step=STEP, take=lambda ids: pool.take(
        ids, model.make_cache), give=pool.give)
    heard = Replies()
    first.add(Request(prompts[6], params[6], heard.emit(0)))
    run(first)
    prompts[6] = prompts[6] + heard.ends[(0, 0)].tokens + prompt(6, 99)
    want = [alone(model, tok, p, s, kv, g)
            for p, s, g in zip(prompts, params, grammars, strict=True)]

    batch = Scheduler(model, tok, kv=kv, prefill_step=STEP,
                      take=lambda ids: pool.take(ids, model.make_cache), give=pool.give)
    heard = Replies()
    for i, (p, s, g) in enumerate(zip(prompts, params, grammars, strict=True)):
        batch.add(Request(p, s, heard.emit(i), grammar=g, logprobs=0))
    run(batch)
    got = [heard.ends[(i, 0)].tokens for i in range(8)]
    assert heard.ends[(6, 0)].cached_tokens > 0  # it did continue the pooled cache
    assert got == want
    singles = Replies()
    for i, (p, s, g) in enumerate(zip(prompts, params, grammars, strict=True)):
        one = Scheduler(model, tok, kv=kv, prefill_step=STEP)
        one.add(Request(p, s, singles.emit(i), grammar=g, logprobs=0))
        run(one)
    diff = max(abs(a - b) for k in heard.logprobs
               for a, b in zip(heard.logprobs[k], singles.logprobs[k], strict=True))
    print(f"kv bits {bits}: max logprob difference batch vs alone {diff:.2e}")
    assert diff < 1e-2  # (tokens equal above; the log-probabilities nearly)


def test_a_cancelled_sequence_leaves_the_others_unchanged(tiny):
    model, tok = tiny
    greedy = SamplingParams(temperature=0, max_tokens=20)
    prompts = [prompt(n, 10 + n) for n in (4, 30, 11, 50)]
    want = [alone(model, tok, p, greedy) for p in prompts]
    scheduler = Scheduler(model, tok, prefill_step=STEP)
    heard = Replies()
    requests = [Request(p, greedy, heard.emit(i)) for i, p in enumerate(prompts)]
    for r in requests:
        scheduler.add(r)

    def cancel_after_three():
        if len(heard.tokens.get((1, 0), [])) == 3:
            requests[1].cancelled.set()

    run(scheduler, cancel_after_three)
    assert len(heard.tokens[(1, 0)]) <= 4 and (1, 0) not in heard.ends
    assert [heard.ends[(i, 0)].tokens for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]


def test_within_a_memory_budget_the_batch_holds_no_more_kv_than_one_request(tiny, monkeypatch):
    """Under a budget whose KV room is 100 positions, requests that each may reach 60 run one
    after another (never two caches of 60 at once), and still give what each gives alone;
    without a budget they run together."""
    from dataclasses import replace

    model, tok = tiny
    greedy = SamplingParams(temperature=0, max_tokens=30)
    prompts = [prompt(30, 40 + i) for i in range(3)]
    want = [alone(model, tok, p, greedy) for p in prompts]
    for budget, most in ((True, 1), (False, 3)):
        if budget:
            monkeypatch.setattr(model, "limits", replace(model.limits, max_context=100,
                                                          memory_plan=object()))
        else:
            monkeypatch.undo()
        scheduler = Scheduler(model, tok, prefill_step=STEP)
        heard, seen = Replies(), []
        for i, p in enumerate(prompts):
            scheduler.add(Request(p, greedy, heard.emit(i)))
        run(scheduler, lambda s=scheduler, seen=seen: seen.append(s.running))
        assert max(seen) == most, seen
        assert [heard.ends[(i, 0)].tokens for i in range(3)] == want


def test_eight_streams_take_few_forward_passes_per_token(tiny, monkeypatch):
    model, tok = tiny
    calls = Calls(monkeypatch)
    scheduler = Scheduler(model, tok, prefill_step=STEP)
    heard = Replies()
    params = SamplingParams(temperature=0.7, max_tokens=64, seed=1)
    for i in range(8):
        scheduler.add(Request(prompt(5 + i, i), params, heard.emit(i)))
    run(scheduler)
    generated = sum(len(t) for t in heard.tokens.values())
    ratio = len(calls.lengths) / generated
    print(f"{len(calls.lengths)} forward passes for {generated} tokens: {ratio:.3f} per token")
    assert generated == 8 * 64 and ratio <= 0.2


def test_a_long_prefill_never_freezes_a_stream_and_a_short_request_goes_first(tiny,
                                                                             monkeypatch):
    """Counted in prefill tokens per pass, not seconds: between two tokens of the running
    stream at most 2 chunks' worth of prompt is prefilled; a 20-token request that arrives
    during the 2,000-token prefill gets its first token before the long one."""
    model, tok = tiny
    calls = Calls(monkeypatch)
    scheduler = Scheduler(model, tok, prefill_step=STEP * 8)
    heard = Replies()
    order: list[tuple[int, int]] = []  # (request, pass) of each token
    params = SamplingParams(temperature=0, max_tokens=200)

    def hear(key):
        emit = heard.emit(key)

        def both(item):
            emit(item)
            if not isinstance(item, Stats) and item.token is not None:
                order.append((key, len(calls.lengths)))
        return both

    scheduler.add(Request(prompt(4, 1), params, hear(0)))
    while not heard.tokens:
        scheduler.step()
    scheduler.add(Request(prompt(2000, 2), SamplingParams(temperature=0, max_tokens=2),
                          hear(1)))
    scheduler.step()
    scheduler.step()  # the long prefill is under way ...
    scheduler.add(Request(prompt(20, 3), SamplingParams(temperature=0, max_tokens=2),
                          hear(2)))  # ... when a short request arrives
    while (1, 0) not in heard.ends:
        scheduler.step()
    prefilled = [sum(n for n in lengths if n > 1) for lengths in calls.lengths]
    stream = [at for key, at in order if key == 0]
    gaps = [sum(prefilled[a:b]) for a, b in zip(stream, stream[1:], strict=False)]
    assert max(gaps) <= 2 * STEP * 8, max(gaps)
    assert sum(prefilled) >= 2000
    firsts = {key: min(at for k, at in order if k == key) for key in (1, 2)}
    assert firsts[2] < firsts[1]


def test_n_choices_share_one_prefill(tiny, monkeypatch):
    model, tok = tiny
    ids = prompt(100, 5)
    want = alone(model, tok, ids, SamplingParams(temperature=0, max_tokens=8))
    calls = Calls(monkeypatch)
    scheduler = Scheduler(model, tok, prefill_step=STEP)
    heard = Replies()
    scheduler.add(Request(ids, SamplingParams(temperature=0, max_tokens=8), heard.emit(0), n=3))
    run(scheduler)
    assert [heard.ends[(0, i)].tokens for i in range(3)] == [want] * 3
    assert sum(sum(lengths) for lengths in calls.lengths) < 100 + 3 * 8 + 3  # one prefill


def test_batch_generate_runs_on_the_scheduler(tiny, monkeypatch):
    from mlx_mixtral.generation.batch import batch_generate

    model, tok = tiny
    texts = [prompt(3, 1), prompt(41, 2), prompt(1, 3)]
    calls = Calls(monkeypatch)
    got = batch_generate(model, tok, texts, temperature=0, max_tokens=10)
    passes = len(calls.lengths)
    want = [next(s.text for s in stream_generate(model, tok, t, temperature=0, max_tokens=10)
                 if isinstance(s, Stats)) for t in texts]
    assert got == want
    assert passes <= 12  # together: about one pass per token, not one per token per prompt


# ---- the server, through the official client -------------------------------------------------


@pytest.fixture(scope="module")
def demo_server():
    from server_helpers import Server

    server = Server("--model", "demo", "--cache-block", "2")  # (short prompts: small blocks)
    yield server
    server.stop()


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("text, settings", [
    ("Once upon a time", {"temperature": 0, "extra_body": {"repetition_penalty": 1.5}}),
    ("Long ago, far away", {"temperature": 0, "presence_penalty": 1.5,
                            "frequency_penalty": 1.0}),
    ("In a small village", {"temperature": 0.7, "seed": 7}),
])
def test_cold_equals_warm(demo_server, text, settings):
    """The same request twice on a server (the issue's request first): the second continues
    the first one's cache, and its penalties still see the whole prompt."""
    client = _client(demo_server)
    replies = [client.completions.create(model="demo", prompt=text, max_tokens=10, **settings)
               for _ in range(2)]
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    assert cached[0] == 0 and cached[1] > 0
    assert replies[0].choices[0].text == replies[1].choices[0].text


@pytest.mark.slow
def test_n_choices_from_the_openai_client(demo_server):
    client = _client(demo_server)
    messages = [{"role": "user", "content": "Name a colour."}]
    greedy = client.chat.completions.create(model="demo", messages=messages, n=3, max_tokens=4,
                                            temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    seeded = [client.chat.completions.create(model="demo", messages=messages, n=3,
                                             max_tokens=4, temperature=1, seed=3)
              for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == \
        [c.message.content for c in seeded[1].choices]
    stream = client.completions.create(model="demo", prompt="Hello", n=2, max_tokens=4,
                                       temperature=1, seed=3, stream=True)
    pieces = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    whole = client.completions.create(model="demo", prompt="Hello", n=2, max_tokens=4,
                                      temperature=1, seed=3)
    assert [pieces[0], pieces[1]] == [c.text for c in whole.choices]


@pytest.mark.slow
def test_structured_output_in_a_batch(tmp_path):
    """4 clients x 3 schemas x 10 seeds at temperature 1, all at once: every reply valid."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema
    from server_helpers import Server, tiny_v3_mixtral

    schemas = [SCHEMA,
               {"type": "object", "properties": {"c": {"enum": ["red", "blue"]}},
                "required": ["c"], "additionalProperties": False},
               {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}]
    server = Server(model=str(tiny_v3_mixtral(tmp_path / "tiny")))
    try:
        client = _client(server)
        model = client.models.list().data[0].id

        def ask(job):
            schema, seed = job
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "JSON please"}],
                temperature=1, seed=seed, max_tokens=30,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": schema}})
            return schema, r.choices[0]

        jobs = [(s, seed) for s in schemas for seed in range(10)]
        with ThreadPoolExecutor(4) as pool:
            for schema, choice in pool.map(ask, jobs):
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(choice.message.content), schema)
    finally:
        server.stop()


def test_threads_may_add_while_the_model_thread_steps(tiny):
    model, tok = tiny
    scheduler = Scheduler(model, tok, prefill_step=STEP)
    heard = Replies()
    adders = [threading.Thread(target=scheduler.add, args=(
        Request(prompt(6, i), SamplingParams(temperature=0, max_tokens=4), heard.emit(i)),))
        for i in range(6)]
    for t in adders:
        t.start()
    for t in adders:
        t.join()
    run(scheduler)
    assert len(heard.ends) == 6 and scheduler.served == 6
    mx.synchronize()


@pytest.mark.parametrize("flag", ["--decode-concurrency", "--prefill-step"])
def test_a_batch_flag_below_one_is_one_line_and_exit_2(flag):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model", "demo",
                          flag, "0"], capture_output=True, text=True, timeout=120)
    lines = [x for x in run.stderr.splitlines() if x.strip() and not x.startswith("Loading")]
    assert run.returncode == 2 and lines == [f"mlx-mixtral: error: {flag} must be at least 1"]
