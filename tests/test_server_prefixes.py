"""`serve` keeps prompts in the prefix store (issue 24): two conversations with the same long
system prompt share its blocks, and a server started again on the same data folder takes them
back from disk. Each reply is compared with the plain path's: a server that keeps nothing
(`--cache-ram 0 --cache-disk 0`), greedy, token for token."""

from __future__ import annotations

import shutil

import openai
import pytest
from conftest import build_hf
from server_helpers import V3_TOKENIZER, Server, scrape

PLAIN = ("--cache-ram", "0", "--cache-disk", "0")  # the plain path: nothing kept
BLOCK = 32  # tokens per block in the sharing test
WINDOW, SMALL_BLOCK = 16, 8  # the windowed Mistral's window; blocks within it


def tiny_v3(folder, model_type: str, **overrides):
    """A random tiny Mistral or Mixtral with the real Mistral v3 tokenizer."""
    experts = dict(num_local_experts=4, num_experts_per_tok=2) if model_type == "mixtral" \
        else {}
    build_hf(folder, model_type, vocab_size=32768, max_position_embeddings=2048,
             **experts, **overrides)
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model")
    return folder


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def chat(server: Server, messages: list[dict], max_tokens: int = 8):
    return client(server).chat.completions.create(model=server.folder_name, messages=messages,
                                                  max_tokens=max_tokens, temperature=0)


def serve(folder, *flags: str, data=None) -> Server:
    server = Server(*flags, model=str(folder), data=data)
    server.folder_name = folder.name
    return server


# About 1,100 tokens of the v3 tokenizer (checked below through usage).
SYSTEM = " ".join(f"Rule {i}: the colour of day {i} is blue." for i in range(90))


def test_two_conversations_share_a_system_prompt(tmp_path):
    folder = tiny_v3(tmp_path / "mixtral", "mixtral")
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Day 3?"}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "And 40?"}]
    server = serve(folder, "--cache-block", str(BLOCK))
    try:
        alone = chat(server, [{"role": "user", "content": "And 40?"}], max_tokens=1)
        chat(server, first)
        shared = chat(server, second)
        metrics, health = scrape(server), server.health()
    finally:
        server.stop()
    plain = serve(folder, *PLAIN)
    try:
        expected = chat(plain, second)
        plain_health = plain.health()
    finally:
        plain.stop()
    system = shared.usage.prompt_tokens - alone.usage.prompt_tokens  # the system prompt's part
    assert system >= 1000, system
    assert shared.usage.prompt_tokens_details.cached_tokens >= system - BLOCK
    assert shared.choices[0].message.content == expected.choices[0].message.content
    assert expected.usage.prompt_tokens_details.cached_tokens == 0
    store = health["prefix_store"]
    assert store["hits"] >= 1 and store["tokens_reused"] >= system - BLOCK
    assert store["ram_bytes"] == health["memory"]["prompt_cache"] > 0
    assert store["disk_bytes"] > 0 and store["blocks_added"] > 0
    assert metrics["mlx_mixtral_prefix_store_hits_total"] == store["hits"]
    assert metrics["mlx_mixtral_prefix_store_ram_bytes"] == store["ram_bytes"]
    assert metrics["mlx_mixtral_prefix_store_tokens_reused_total"] == store["tokens_reused"]
    assert plain_health["prefix_store"] is None  # the plain path keeps nothing


# A long question (past the windowed model's window many times over), then another.
LONG = " ".join(f"Item {i} weighs {i * 7 % 13} grams." for i in range(20))


@pytest.mark.parametrize("model_type,flags", [
    ("mistral", ()),  # a sliding window of 16, blocks of 8: prefill chunks of 9
    ("mixtral", ()),
    ("mixtral", ("--kv-bits", "8", "--kv-group-size", "32")),
], ids=["windowed-mistral", "mixtral", "mixtral-8bit-kv"])
def test_a_restarted_server_continues_from_disk_exactly(tmp_path, model_type, flags):
    shape = dict(sliding_window=WINDOW) if model_type == "mistral" else {}
    if flags:
        shape["head_dim"] = 32  # (32-wide quantization groups fit)
    folder = tiny_v3(tmp_path / model_type, model_type, **shape)
    block = ("--cache-block", str(SMALL_BLOCK))
    ask = [{"role": "user", "content": LONG}]
    server = serve(folder, *block, *flags, data=tmp_path / "data")
    try:
        reply = chat(server, ask).choices[0].message.content
    finally:
        server.stop()
    follow = [*ask, {"role": "assistant", "content": reply},
              {"role": "user", "content": "Which is heaviest?"}]
    again = serve(folder, *block, *flags, data=tmp_path / "data")
    try:
        warm = chat(again, follow)
        store = again.health()["prefix_store"]
    finally:
        again.stop()
    plain = serve(folder, *PLAIN, *flags)
    try:
        cold = chat(plain, follow)
    finally:
        plain.stop()
    assert warm.usage.prompt_tokens > 4 * WINDOW
    assert warm.usage.prompt_tokens_details.cached_tokens > WINDOW, warm.usage
    assert store["disk_block_hits"] > 0  # (from disk: the new process's memory had none)
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert warm.usage.completion_tokens == cold.usage.completion_tokens


@pytest.mark.parametrize("flags,named", [
    (["--cache-ram", "lots"], "--cache-ram"),
    (["--prompt-cache-bytes", "-1GB"], "--prompt-cache-bytes"),
    (["--cache-ram", "1GB", "--prompt-cache-bytes", "2GB"], "--prompt-cache-bytes"),
    (["--cache-disk", "12 parsecs"], "--cache-disk"),
    (["--cache-block", "0"], "--cache-block"),
])
def test_bad_store_flags_are_one_line(capsys, flags, named):
    from cli_helpers import refusal

    line = refusal(["serve", "--model", "demo", *flags], capsys)
    assert named in line and "Traceback" not in line, line
