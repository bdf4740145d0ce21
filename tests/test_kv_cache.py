"""The KV cache: mlx-lm's protocol, prompt-cache files, quantized keys and values, and
mlx-lm's call shapes (no hidden global state)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf
from kv_helpers import GREEDY, WINDOW, Ids, build_models, decode_logits, filled, run, tokens
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
from mlx_lm.models.cache import save_prompt_cache as mlx_lm_save_prompt_cache
from test_chat_format import OURS

from mlx_mixtral import load_model
from mlx_mixtral.errors import GenerationError, PromptCacheError
from mlx_mixtral.generation import Chunk, stream_generate
from mlx_mixtral.generation.kv import KVSettings
from mlx_mixtral.loading.prompt_cache import load_prompt_cache, save_prompt_cache
from mlx_mixtral.model.cache import FullKVCache, RollingKVCache

V1 = OURS["mistral-v1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


# ---- the protocol ---------------------------------------------------------------------------


def test_protocol_and_names():
    for cls in (FullKVCache, RollingKVCache):
        assert not hasattr(mlx_lm_cache, cls.__name__)  # never rebuilt as mlx-lm's class
    full, rolling = FullKVCache(), RollingKVCache(4)
    for cache in (full, rolling):
        assert cache.empty() and cache.size() == 0 and cache.is_trimmable()
        k = mx.random.normal((1, 2, 6, 32))
        cache.update_and_fetch(k, k)
        assert not cache.empty() and cache.size() == 6 and cache.nbytes > 0
        mask = cache.make_mask(3, return_array=True, window_size=getattr(cache, "window", None))
        assert isinstance(mask, mx.array) and mask.dtype == mx.bool_
        rebuilt = type(cache).from_state(cache.state, cache.meta_state)
        assert rebuilt.offset == cache.offset and rebuilt.meta_state == cache.meta_state
        assert cache.trim(2) == 2 and cache.size() == 4
        quantized = cache.to_quantized(group_size=32, bits=8)
        assert quantized.bits == 8 and isinstance(quantized.keys, tuple)
        assert quantized.to_quantized(32, 8) is quantized


def test_mlx_lm_cannot_silently_rebuild_ours(models, tmp_path):
    cache = filled(models["mistral"], 8)
    mlx_lm_save_prompt_cache(str(tmp_path / "theirs.safetensors"), cache)
    with pytest.raises(KeyError):
        mlx_lm_load_prompt_cache(str(tmp_path / "theirs.safetensors"))


def test_mlx_lm_generate_step_quantizes_our_caches(models):
    from mlx_lm.generate import generate_step

    for name in ("mistral", "mixtral"):
        cache = models[name].make_cache()
        steps = generate_step(mx.array(tokens(40)), models[name], max_tokens=4,
                              prompt_cache=cache, kv_bits=8, kv_group_size=32,
                              quantized_kv_start=0)
        list(steps)
        assert all(c.bits == 8 for c in cache), name


# ---- prompt-cache files ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mistral-before-wrap", "mistral-wrapped", "mixtral",
                                  "mistral-quantized", "mixtral-quantized"])
def test_round_trip_then_decode_equal(models, tmp_path, case):
    name = case.split("-")[0]
    model = models[name]
    cache = filled(model, WINDOW - 4 if "before" in case else 3 * WINDOW + 5)
    if "quantized" in case:
        cache = [c.to_quantized(group_size=32, bits=8) for c in cache]
    path = tmp_path / "cache.safetensors"
    held = list(range(cache[0].offset))
    save_prompt_cache(path, cache, {"note": "hi"}, model=model, tokens=held)
    loaded, meta = load_prompt_cache(path, return_metadata=True, model=model)
    assert meta["note"] == "hi" and meta["tokens"] == held
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert (decode_logits(model, loaded) == decode_logits(model, cache)).all()


def test_bad_prompt_cache_files(models, tmp_path):
    model = models["mistral"]
    good = tmp_path / "good.safetensors"
    save_prompt_cache(good, filled(model, 20), model=model, tokens=list(range(20)))
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"\x00" * 64,
             "empty": b"", "header only": data[:8]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PromptCacheError):
            load_prompt_cache(tmp_path / name)
    with pytest.raises(PromptCacheError, match="another model"):
        load_prompt_cache(good, model=models["draft"])
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"x": mx.zeros(3)})
    with pytest.raises(PromptCacheError, match="not an mlx-mixtral prompt cache") as refused:
        load_prompt_cache(tmp_path / "plain.safetensors")
    # (a file that is not ours may be anyone's: the advice is another path, not deletion)
    assert "give another path, or delete the file if it was a prompt cache" in \
        str(refused.value)


def test_a_prompt_cache_that_cannot_be_written_is_one_error(models, tmp_path):
    """MLX failing to write the file (here: its hidden partial name is taken by a folder,
    which even root cannot write over) is a PromptCacheError naming the path, which the
    command says in one line, not MLX's RuntimeError and a traceback; nothing is left."""
    import os

    model = models["mistral"]
    target = tmp_path / "cache.safetensors"
    (tmp_path / f".{target.name}.partial-{os.getpid()}.safetensors").mkdir()
    with pytest.raises(PromptCacheError, match="cannot save the prompt cache there") as e:
        save_prompt_cache(target, filled(model, 20), model=model, tokens=list(range(20)))
    assert str(target) in str(e.value) and not target.exists()


# ---- quantized keys and values ------------------------------------------------------------


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_8_bit_kv_follows_the_float_cache(models, name):
    prompt = tokens(24)
    plain = run(models[name], prompt).tokens
    quantized = run(models[name], prompt, kv=KVSettings(8, 32)).tokens
    assert len(plain) == 64
    assert np.mean([a == b for a, b in zip(plain, quantized, strict=True)]) >= 0.9


def test_rolling_quantized_cache_stays_flat(models):
    model = models["mistral"]
    sizes = []
    for n in (WINDOW, 4 * WINDOW):
        cache = [c.to_quantized(group_size=32, bits=4) for c in model.make_cache()]
        mx.eval(model(mx.array([tokens(n)]), cache=cache))
        sizes.append(sum(c.nbytes for c in cache))
    assert sizes[0] == sizes[1]


def test_bench_reports_kv_bytes_per_token_in_float16(tmp_path):
    from mlx_mixtral.cli.bench import kv_bytes_per_token

    build_hf(tmp_path, "mistral", head_dim=64, sliding_window=64)
    figures = kv_bytes_per_token(load_model(tmp_path, dtype="float16"), kv_group_size=64)
    assert figures["none"]["vs_float16"] == pytest.approx(1.0)
    assert figures["8"]["vs_float16"] <= 0.55 and figures["4"]["vs_float16"] <= 0.30


def test_bad_kv_settings():
    with pytest.raises(GenerationError, match="kv_bits"):  # the parameter (the CLI: its flag)
        KVSettings(5)
    with pytest.raises(GenerationError, match="kv_group_size"):
        KVSettings(8, 48)
    # the advice is a size that is allowed and divides, or that none does (no dead end)
    with pytest.raises(GenerationError, match="does not divide .*; use kv_group_size=32$"):
        KVSettings(8, 64).check(32)
    with pytest.raises(GenerationError, match="none of 32, 64, 128 does"):
        KVSettings(8, 64).check(16)


# ---- mlx-lm's call shapes, and no hidden global state ----------------------------------------


@pytest.mark.parametrize("case", ["mistral-before-wrap", "mistral-wrapped", "mixtral"])
def test_mlx_lm_shaped_save_round_trips(models, tmp_path, case):
    """save_prompt_cache(path, cache[, metadata]), as mlx-lm calls it, loads back as it was:
    8 decode steps give exactly the logits of the original (the window wraps during them, or
    wrapped before)."""
    model = models[case.split("-")[0]]
    cache = filled(model, WINDOW - 4 if "before" in case else 3 * WINDOW + 5)
    save_prompt_cache(tmp_path / "a.safetensors", cache)
    save_prompt_cache(tmp_path / "b.safetensors", cache, {"note": "hi"})
    loaded = load_prompt_cache(tmp_path / "a.safetensors")
    again, meta = load_prompt_cache(tmp_path / "b.safetensors", return_metadata=True)
    assert meta["note"] == "hi" and meta["tokens"] is None  # which tokens: not recorded
    assert [c.offset for c in loaded] == [c.offset for c in cache]
    want = decode_logits(model, cache, steps=8)
    assert (decode_logits(model, loaded, steps=8) == want).all()
    assert (decode_logits(model, again, steps=8) == want).all()


def test_a_cache_saved_without_tokens_or_model_is_refused_where_they_are_needed(models,
                                                                             tmp_path):
    from mlx_mixtral.cli.generate import _reused_cache

    model, path = models["mistral"], tmp_path / "c.safetensors"
    save_prompt_cache(path, filled(model, 8))
    with pytest.raises(PromptCacheError, match="does not record the model"):
        load_prompt_cache(path, model=model)
    save_prompt_cache(path, filled(model, 8), model=model)
    with pytest.raises(PromptCacheError, match="saved without the tokens"):
        _reused_cache(str(path), model, tokens(12), 0)


@pytest.mark.parametrize("start", [0, 30])
def test_mlx_lm_kv_keywords_equal_kv_settings(models, start):
    """kv_bits / kv_group_size / quantized_kv_start, mlx-lm's names, do what KVSettings does:
    the same tokens, and the caches quantized to those bits."""
    model, prompt = models["mixtral"], tokens(24)
    ours = KVSettings(8, 32, start)
    caches = [model.make_cache(), model.make_cache()]
    by_name = run(model, prompt, kv_bits=8, kv_group_size=32, quantized_kv_start=start,
                  cache=caches[0])
    by_settings = run(model, prompt, kv=ours, cache=caches[1])
    assert by_name.tokens == by_settings.tokens and len(by_name.tokens) == 64
    assert all(c.bits == 8 and c.group_size == 32 for cache in caches for c in cache)
    with pytest.raises(GenerationError, match="not both"):
        run(model, prompt, kv=ours, kv_bits=8)


class TheirQuantizedCache(mlx_lm_cache.QuantizedKVCache):
    """mlx-lm's quantized cache, spoken to as our model speaks (tuples, our mask call)."""

    def update_and_fetch(self, keys, values):
        keys, values = super().update_and_fetch(keys, values)
        return tuple(keys), tuple(values)

    def make_mask(self, n, return_array=False, window_size=None):
        return mlx_lm_cache.create_attention_mask(n, self.offset, return_array, window_size)


class TheirCache(mlx_lm_cache.KVCache):
    """mlx-lm's float cache, which its `generate_step` quantizes into TheirQuantizedCache."""

    def make_mask(self, n, return_array=False, window_size=None):
        return mlx_lm_cache.create_attention_mask(n, self.offset, return_array, window_size)

    def to_quantized(self, group_size=64, bits=4):
        quantized = super().to_quantized(group_size, bits)
        quantized.__class__ = TheirQuantizedCache
        return quantized


def mlx_lm_greedy(model, prompt: list[int], n: int, **kv) -> list[int]:
    """Greedy tokens with mlx-lm's own caches and their quantization (the oracle)."""
    from mlx_lm.generate import generate_step

    cache = [TheirCache() for _ in model.layers]
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n,
                                             prompt_cache=cache, **kv)]


@pytest.mark.parametrize("start", [0, 30])
def test_4_bit_kv_from_a_start_equals_mlx_lm_quantized_cache(models, start):
    """4-bit keys and values from token `start` on (`--kv-bits 4 --quantized-kv-start`): the
    tokens mlx-lm's QuantizedKVCache gives with the same model, not the float cache's."""
    model, prompt = models["mixtral"], tokens(24)
    got = run(model, prompt, kv=KVSettings(4, 32, start)).tokens
    want = mlx_lm_greedy(model, prompt, 64, kv_bits=4, kv_group_size=32,
                         quantized_kv_start=start)
    assert got == want
    other_start = mlx_lm_greedy(model, prompt, 64, kv_bits=4, kv_group_size=32,
                                quantized_kv_start=30 - start)
    assert got != other_start and got != run(model, prompt).tokens  # (so start and bits tell)


def test_logprobs_are_the_models_log_softmax(models):
    """Each chunk's logprob and top alternatives: NumPy's log-softmax of the model's logits
    over the prompt and the tokens before it (one full pass, no cache)."""
    model, prompt = models["mistral"], tokens(12)
    replies = stream_generate(model, Ids(), prompt, sampling=GREEDY, max_tokens=20, logprobs=3)
    chunks = [c for c in replies if isinstance(c, Chunk) and c.token is not None]
    ids = prompt + [c.token for c in chunks]
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    logits = logits[len(prompt) - 1:-1]  # the rows that predicted each reply token
    top = logits.max(axis=-1, keepdims=True)
    expected = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    assert len(chunks) == 20
    for chunk, row in zip(chunks, expected, strict=True):
        assert chunk.logprob == pytest.approx(row[chunk.token], abs=1e-4)
        best = np.argsort(-row)[:3]
        assert [t for t, _ in chunk.top_logprobs] == best.tolist()
        assert [v for _, v in chunk.top_logprobs] == pytest.approx(row[best], abs=1e-4)


def test_a_seeded_reply_keeps_to_itself(models):
    """A seeded reply is the same when another one is generated in between its tokens, and
    leaves MLX's global random state as it found it."""
    model, prompt = models["mistral"], tokens(12)
    sampled = dict(temperature=1.0, top_p=1.0, min_p=0.0, max_tokens=16)

    def reply(seed: int | None):
        return stream_generate(model, Ids(), prompt, **sampled, seed=seed)

    alone = [c.token for c in reply(1) if isinstance(c, Chunk)]
    before = np.array(mx.random.state[0])
    a, b = reply(1), reply(None)  # interleaved: one token of each in turn
    mixed: list = []
    for x, _ in zip(a, b, strict=False):
        if isinstance(x, Chunk):
            mixed.append(x.token)
    mixed += [c.token for c in a if isinstance(c, Chunk)]
    assert mixed == alone and len(set(alone)) > 3  # (sampled: not one repeated token)
    mx.random.seed(5)
    state = np.array(mx.random.state[0])
    list(reply(2))
    assert (np.array(mx.random.state[0]) == state).all()
    assert not (before == state).all()


def test_generation_leaves_the_peak_memory_counter_alone(models):
    """MLX's process-wide peak is not reset by a reply; the reply's own figure is its own
    (exact after a reset, below an earlier peak that it did not reach)."""
    model, prompt = models["mistral"], tokens(12)
    big = mx.zeros((64, 1024, 1024))  # 256 MB, far above what the tiny model's reply needs
    mx.eval(big)
    del big
    earlier = mx.get_peak_memory()
    stats = run(model, prompt, max_tokens=8)
    assert mx.get_peak_memory() >= earlier
    assert 0 < stats.peak_memory < earlier
    mx.reset_peak_memory()
    stats = run(model, prompt, max_tokens=8)
    assert stats.peak_memory == mx.get_peak_memory()
