"""Generation: sampling controls, stop strings, stats, batches, and multi-turn ChatSession."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from test_chat_format import OURS

from mlx_mixtral import Model, ModelArgs
from mlx_mixtral.errors import ChatFormatError, GenerationError, SamplingError
from mlx_mixtral.generation import Chunk, Stats, batch_generate, generate, stream_generate
from mlx_mixtral.generation.session import ChatSession

V1, V3 = OURS["mistral-v1"], OURS["mistral-v3"]


def tiny(vocab: int, window: int | None = None, context: int = 4096, moe: bool = False,
         seed: int = 0) -> Model:
    mx.random.seed(seed)
    args = ModelArgs.from_dict(dict(
        model_type="mixtral" if moe else "mistral", vocab_size=vocab, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=window, max_position_embeddings=context, num_local_experts=4))
    model = Model(args)
    model.update(tree_map(lambda p: p * 2, model.parameters()))  # livelier than the default
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model_v1():
    return tiny(V1.vocab_size, moe=True)


def run(model, tokenizer, prompt, **kw) -> tuple[list[Chunk], Stats]:
    items = list(stream_generate(model, tokenizer, prompt, **kw))
    return items[:-1], items[-1]


def test_stream_then_stats(model_v1):
    chunks, stats = run(model_v1, V1, "Tell me a story", temperature=0, max_tokens=12)
    assert all(isinstance(c, Chunk) for c in chunks) and isinstance(stats, Stats)
    assert [c.token for c in chunks[:-1]] == stats.tokens
    assert chunks[-1].token is None and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == stats.text == V1.decode(stats.tokens)
    assert stats.generation_tokens == 12
    assert stats.prompt_tokens == len(V1.apply_chat_template(
        [{"role": "user", "content": "Tell me a story"}]))
    assert stats.ttft > 0 and stats.prompt_tps > 0 and stats.generation_tps > 0
    assert stats.peak_memory > 0


def test_greedy_and_seeded_sampling_reproducible(model_v1):
    greedy = [generate(model_v1, V1, "Hi", temperature=0, max_tokens=10) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = [generate(model_v1, V1, "Hi", temperature=1.0, top_p=1.0, min_p=0.0, seed=7,
                        max_tokens=10) for _ in range(2)]
    assert sampled[0] == sampled[1]
    other = generate(model_v1, V1, "Hi", temperature=1.0, top_p=1.0, min_p=0.0, seed=8,
                     max_tokens=10)
    assert other != sampled[0]  # the seed matters
    top1 = generate(model_v1, V1, "Hi", temperature=1.0, top_k=1, seed=3, max_tokens=10)
    assert top1 == greedy[0]


def test_stop_string_is_not_emitted(model_v1):
    _, full = run(model_v1, V1, "Hi", temperature=0, max_tokens=16)
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    chunks, stats = run(model_v1, V1, "Hi", temperature=0, max_tokens=16, stop=[stop])
    assert stats.finish_reason == "stop"
    assert stats.text == text[: text.index(stop)]
    assert "".join(c.text for c in chunks) == stats.text


def test_eos_stops_generation(model_v1):
    _, full = run(model_v1, V1, "Hi", temperature=0, max_tokens=8)
    eos_like = full.tokens[3]

    class Tok(type(V1)):
        pass

    tok = Tok.__new__(Tok)
    tok.__dict__.update(V1.__dict__)
    tok.eos_ids = {eos_like}
    _, stats = run(model_v1, tok, "Hi", temperature=0, max_tokens=8)
    assert stats.finish_reason == "stop"
    assert stats.tokens == full.tokens[: full.tokens.index(eos_like) + 1]
    assert stats.text == V1.decode(full.tokens[: full.tokens.index(eos_like)])


def test_chunked_prefill_same_reply(model_v1):
    prompt = "word " * 60
    a = generate(model_v1, V1, prompt, temperature=0, max_tokens=6, prefill_step_size=7)
    b = generate(model_v1, V1, prompt, temperature=0, max_tokens=6, prefill_step_size=4096)
    assert a == b


@pytest.mark.parametrize("kw, error, words", [
    (dict(max_tokens=0), SamplingError, "max_tokens"),
    (dict(max_tokens=-3), SamplingError, "max_tokens"),
    (dict(temperature=-1), SamplingError, "temperature"),
    (dict(top_p=1.5), SamplingError, "top_p"),
    (dict(nonsense=1), SamplingError, "unknown setting"),
    # mlx-lm's spellings are told their names here (an mlx-lm user's first tries)
    (dict(temp=0), SamplingError, r"temp \(use temperature=\)"),
    (dict(verbose=True, prompt_cache=[]), SamplingError,
     r"prompt_cache \(use cache=\), verbose \(not taken"),
])
def test_bad_settings(model_v1, kw, error, words):
    with pytest.raises(error, match=words):
        generate(model_v1, V1, "Hi", **kw)


def test_prompt_longer_than_context():
    model = tiny(V1.vocab_size, context=32)
    with pytest.raises(GenerationError, match="context is 32"):
        generate(model, V1, "word " * 40)


def test_non_utf8_prompt_is_replaced(model_v1):
    text = generate(model_v1, V1, "caf\udce9 \udcff", temperature=0, max_tokens=3)
    assert isinstance(text, str)
    with pytest.raises(ChatFormatError):
        generate(model_v1, V1, [{"role": "user", "content": None}])


@pytest.mark.parametrize("window", [None, 8])
def test_batch_equals_single_runs(window):
    model = tiny(V1.vocab_size, window=window, seed=1)
    prompts = ["Hi", "What is the capital of France?", "Write a haiku about the sea, please",
               "ok"]
    singles = [generate(model, V1, p, temperature=0, max_tokens=12) for p in prompts]
    assert batch_generate(model, V1, prompts, temperature=0, max_tokens=12) == singles


# ---- ChatSession ------------------------------------------------------------------------

MESSAGES = ["Hello there!", "What can you do?", "Tell me about Paris.", "And Rome?",
            "Which is older?", "Thanks 🙏", "Write a poem.", "Shorter please.",
            "In French?", "Bye!", "One more thing."]


@pytest.mark.parametrize("tokenizer, window, system", [
    (V1, None, "Be brief."),
    (V1, 16, None),  # the conversation outgrows the window
    (V3, 16, "Be brief."),  # v3 moves the system prompt every turn
])
def test_chat_session_reuses_the_cache_exactly(tokenizer, window, system):
    model = tiny(tokenizer.vocab_size, window=window, moe=True, seed=2)
    chat = ChatSession(model, tokenizer, system=system, temperature=0, max_tokens=6)
    for i, text in enumerate(MESSAGES[:10]):
        before = len(chat.cached)
        stats = list(chat.send(text))[-1]
        assert chat.cache[0].offset == len(chat.cached)
        if i == 9:
            new_ids = len(chat.conversation_ids()) - len(stats.tokens) - (
                0 if stats.tokens[-1] in tokenizer.eos_ids else 1)
            prefix = before if (tokenizer is V1 or not system) else None
            if prefix is not None:  # turn 10 prefilled only the new tokens
                assert stats.prompt_tokens == new_ids - before
                assert stats.prompt_tokens <= len(tokenizer.encode(f"[INST] {text} [/INST]")) + 1
    # The next reply's logits: through the session's cache, and from scratch.
    chat.messages.append({"role": "user", "content": MESSAGES[10]})
    ids = chat.conversation_ids()
    new = chat._sync_cache(ids)
    cached = model(mx.array([new]), cache=chat.cache)[0, -1]
    scratch = model(mx.array([ids]))[0, -1]
    assert np.abs(np.array(cached) - np.array(scratch)).max() <= 1e-4
    assert len(ids) > (window or 0) * 3


def test_regenerate_and_edit_trim_the_cache():
    model = tiny(V1.vocab_size, moe=True, seed=3)
    chat = ChatSession(model, V1, temperature=0, max_tokens=6)
    list(chat.send("Hello"))
    list(chat.send("How are you?"))
    first = chat.messages[-1]["content"]
    stats = list(chat.regenerate(temperature=1.0, top_p=1.0, min_p=0.0, seed=1))[-1]
    assert stats.prompt_tokens == 1  # only the last prompt token is fed again
    assert chat.cache[0].offset == len(chat.cached)
    greedy_again = list(chat.regenerate())[-1]
    assert greedy_again.text == first
    stats = list(chat.edit_last("How old are you?"))[-1]
    assert len(chat.messages) == 4 and chat.messages[2]["content"] == "How old are you?"
    assert stats.prompt_tokens <= len(V1.encode("[INST] How old are you? [/INST]"))
    assert chat.cache[0].offset == len(chat.cached)


def test_stopping_early_keeps_the_session_consistent():
    model = tiny(V1.vocab_size, seed=4)
    chat = ChatSession(model, V1, temperature=0, max_tokens=20)
    stream = chat.send("Hello")
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.cache[0].offset == len(chat.cached)
    list(chat.send("Go on"))
    assert chat.cache[0].offset == len(chat.cached)


def test_outgrowing_the_context_drops_oldest_turns_keeps_system():
    model = tiny(V1.vocab_size, context=96, seed=5)
    chat = ChatSession(model, V1, system="Be brief.", temperature=0, max_tokens=8)
    for text in MESSAGES:
        list(chat.send(text))
    assert chat.messages[0]["content"] != MESSAGES[0]  # the oldest turns went
    assert chat.messages[-2]["content"] == MESSAGES[-1]
    assert chat.conversation_ids()[:8] == V1.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": chat.messages[0]["content"]}])[:8]
    assert len(chat.cached) < 96
