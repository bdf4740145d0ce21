"""The KV cache all the way: mlx-lm's protocol, prompt-cache files, quantized keys and values,
saved caches in chat, and drafted decoding (draft model and prompt lookup)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
from mlx_lm.models.cache import save_prompt_cache as mlx_lm_save_prompt_cache
from test_chat_format import OURS

from mlx_mixtral import load_model
from mlx_mixtral.errors import GenerationError, PromptCacheError
from mlx_mixtral.generation import ChatSession, Stats, stream_generate
from mlx_mixtral.generation.kv import KVSettings
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.speculative import LookupDrafter, ModelDrafter
from mlx_mixtral.loading.prompt_cache import load_prompt_cache, save_prompt_cache
from mlx_mixtral.model.cache import FullKVCache, RollingKVCache

WINDOW = 16
GREEDY = SamplingParams(temperature=0, min_p=0, max_tokens=64)
V1 = OURS["mistral-v1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models with head_dim 32 (so 32-wide quantization groups fit): a Mistral with a
    window, a Mixtral with full attention, and a Mistral draft sharing their vocabulary."""
    out = {}
    for name, kind, extra in (("mistral", "mistral", dict(sliding_window=WINDOW)),
                              ("mixtral", "mixtral", dict(num_local_experts=4,
                                                          num_experts_per_tok=2)),
                              ("draft", "mistral", dict(sliding_window=WINDOW, seed=9))):
        folder = tmp_path_factory.mktemp(name)
        build_hf(folder, kind, head_dim=32, **extra)
        out[name] = load_model(folder)
    return out


class Ids:
    """A tokenizer stand-in for prompts given as token ids (no text)."""

    eos_ids: set[int] = set()
    eos_id = -1

    def detokenizer(self):
        return self

    def add_token(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


def tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(3, 128, n)]


def run(model, prompt, **kw) -> Stats:
    return list(stream_generate(model, Ids(), prompt, **{"sampling": GREEDY, **kw}))[-1]


def filled(model, n: int, seed: int = 0) -> list:
    cache = model.make_cache()
    mx.eval(model(mx.array([tokens(n, seed)]), cache=cache))
    return cache


def decode_logits(model, cache, steps: int = 16) -> np.ndarray:
    out = []
    for t in tokens(steps, seed=5):
        out.append(np.array(model(mx.array([[t]]), cache=cache)))
    return np.concatenate(out, axis=1)


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
    with pytest.raises(PromptCacheError, match="not an mlx-mixtral prompt cache"):
        load_prompt_cache(tmp_path / "plain.safetensors")


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
    with pytest.raises(GenerationError, match="--kv-bits"):
        KVSettings(5)
    with pytest.raises(GenerationError, match="--kv-group-size"):
        KVSettings(8, 48)
    with pytest.raises(GenerationError, match="does not divide"):
        KVSettings(8, 64).check(32)


# ---- drafted decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_drafted_decoding_is_token_identical(models, name):
    """Window 16, 64 generated tokens: rejected drafts are trimmed from wrapped caches."""
    prompt = tokens(24)
    plain = run(models[name], prompt)
    with_draft = run(models[name], prompt, draft=ModelDrafter(models["draft"], 3))
    lookup = run(models[name], prompt + prompt[:12], draft=LookupDrafter(4))
    assert with_draft.tokens == plain.tokens
    assert lookup.tokens == run(models[name], prompt + prompt[:12]).tokens
    assert with_draft.draft_proposed > 0 and lookup.draft_proposed > 0
    assert with_draft.forward_passes < len(plain.tokens) + 1
    self_draft = run(models[name], prompt, draft=ModelDrafter(models[name], 3))
    assert self_draft.tokens == plain.tokens
    assert self_draft.forward_passes <= len(plain.tokens) / 3  # all drafts accepted


def test_drafted_sampling_keeps_the_distribution(models):
    """Sampled with drafts, the first token follows the model's own distribution (top-4 at
    temperature 2: four likely tokens, so a few hundred samples tell)."""
    model, prompt = models["mistral"], tokens(10)
    sampling = SamplingParams(temperature=2.0, top_k=4, top_p=1.0, min_p=0, max_tokens=1)
    logits = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    exact = np.array(sampling.distribution(logits - mx.logsumexp(logits)))
    for drafter in (lambda: ModelDrafter(models["draft"], 2), lambda: LookupDrafter(2)):
        seen = np.zeros_like(exact)
        for seed in range(400):
            seen[run(model, prompt, sampling=sampling, seed=seed, draft=drafter()).tokens[0]] += 1
        assert 0.5 * np.abs(seen / seen.sum() - exact).sum() < 0.1


@pytest.mark.slow
def test_prompt_lookup_on_the_demo_model_repeating_a_passage():
    from mlx_mixtral import load

    passage = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, "
               "carrying a brass lantern and a worn notebook. He recorded the ships that "
               "passed, the color of the sky, and the mood of the restless sea below.")
    model, tokenizer = load()
    prompt = f"Repeat this passage exactly, word for word:\n\n{passage}"
    greedy = SamplingParams(temperature=0, min_p=0, max_tokens=60)
    plain = list(stream_generate(model, tokenizer, prompt, sampling=greedy))[-1]
    drafted = list(stream_generate(model, tokenizer, prompt, sampling=greedy,
                                   draft=LookupDrafter(4)))[-1]
    assert drafted.tokens == plain.tokens
    assert passage[:60] in plain.text  # it does repeat the passage
    assert drafted.forward_passes / drafted.generation_tokens <= 0.6


# ---- saved caches in chat -----------------------------------------------------------------


class Counting:
    """The model, counting the tokens it is given."""

    def __init__(self, model) -> None:
        self.model, self.seen = model, 0
        self.args, self.layers = model.args, model.layers

    def make_cache(self, slack: int = 0) -> list:
        return self.model.make_cache(slack)

    def __call__(self, inputs, cache=None, **kw):
        self.seen += inputs.shape[1]
        return self.model(inputs, cache=cache, **kw)


@pytest.mark.slow
def test_reopened_chat_prefills_only_the_new_message(tmp_path):
    from app_helpers import tiny_model_folder

    from mlx_mixtral import load
    from mlx_mixtral.app.engine import Prompt
    from mlx_mixtral.app.mlx_engine import MlxEngine
    from mlx_mixtral.app.prompt_caches import PromptCaches

    folder = tiny_model_folder(tmp_path / "tiny")
    model, tokenizer = load(folder)
    words = " ".join(f"w{i}" for i in range(300))
    session = ChatSession(model, tokenizer, sampling=SamplingParams(temperature=0, max_tokens=40))
    while len(session.cached) < 2000:
        list(session.send(words))
    history = session.messages
    caches = PromptCaches(tmp_path / "caches")
    engine = MlxEngine(str(folder), caches=caches)
    engine.load(lambda _: None)
    engine.session, engine.key = session, "7"  # the chat stored as 7
    engine._save()  # what a completed reply does

    restarted = MlxEngine(str(folder), caches=caches)  # a new app: nothing in memory
    restarted.load(lambda _: None)
    counting = Counting(restarted.session.model)
    restarted.session.model = counting
    message = " ".join(["the"] * 20)
    assert len(tokenizer.encode(message)) == 20
    restarted.reply(Prompt([*history, {"role": "user", "content": message}], None, "7"),
                    SamplingParams(temperature=0, max_tokens=1), lambda e: None, lambda: False)
    framing = len(tokenizer.encode("[INST]  [/INST]"))
    assert len(session.cached) >= 2000
    # the message, its [INST] framing, the last reply's EOS, the token sampled
    assert counting.seen <= 20 + framing + 3


def test_damaged_cache_in_the_app_is_ignored(tmp_path, caplog):
    from app_helpers import tiny_model_folder

    from mlx_mixtral.app.engine import Prompt
    from mlx_mixtral.app.mlx_engine import MlxEngine
    from mlx_mixtral.app.prompt_caches import PromptCaches

    caches = PromptCaches(tmp_path / "caches")
    caches.folder.mkdir()
    caches.path("3").write_bytes(b"not a cache at all")
    engine = MlxEngine(str(tiny_model_folder(tmp_path / "tiny")), caches=caches)
    engine.load(lambda _: None)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    events = []
    with caplog.at_level("WARNING"):  # opened (and its reading stopped at once)
        engine.prefill(Prompt(chat, None, "3"), events.append, lambda: True)
    assert not caches.path("3").exists() and "ignored" in caplog.text
    engine.reply(Prompt([*chat, {"role": "user", "content": "again"}], None, "3"),
                 SamplingParams(temperature=0, max_tokens=3), events.append, lambda: False)
    assert isinstance(events[-1], Stats) and events[-1].error is None
    assert caches.path("3").exists()  # saved afresh after the reply


def test_cache_files_keep_to_their_budget(tmp_path):
    from mlx_mixtral.app.prompt_caches import PromptCaches

    caches = PromptCaches(tmp_path, budget=250)
    for i in range(5):
        caches.path(str(i)).write_bytes(b"x" * 100)
        import os

        os.utime(caches.path(str(i)), (i, i))
    caches.used("0")  # the oldest, but just used
    caches.evict()
    assert sorted(p.name for p in caches.files()) == [
        "conversation-0.safetensors", "conversation-4.safetensors"]


def test_json_metadata_is_plain(models, tmp_path):
    save_prompt_cache(tmp_path / "c.safetensors", filled(models["mixtral"], 4), {"a": "b"},
                      model=models["mixtral"], tokens=[1, 2, 3, 4])
    _, meta = mx.load(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert json.loads(meta["tokens"]) == [1, 2, 3, 4] and meta["format"]


# ---- the command line ---------------------------------------------------------------------


def cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], capture_output=True,
                          text=True, timeout=600)


def one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("mlx-mixtral: error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from app_helpers import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny-cli"))


def test_cli_prompt_cache_reused_and_refused_for_another_model(tiny_folder, tmp_path):
    from mlx_mixtral.loading.demo import demo_model_path

    path = str(tmp_path / "doc.safetensors")
    base = ["generate", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "4",
            "--prompt-cache", path]
    first = cli(*base, "--prompt", "A long document: " + "lorem ipsum " * 40 + "Summarise.")
    assert first.returncode == 0, first.stderr
    again = cli(*base, "--prompt", "A long document: " + "lorem ipsum " * 40 + "Shorter.")
    assert again.returncode == 0, again.stderr
    reused = int(again.stderr.split("Prompt cache: ")[1].split()[0])
    assert reused >= 80  # the document was not prefilled again
    other = cli("generate", "--model", str(demo_model_path()), "--prompt", "hi",
                "--prompt-cache", path)
    one_line_error(other, "another model")


def test_cli_bad_drafting_and_kv_flags(tiny_folder):
    from mlx_mixtral.loading.demo import demo_model_path

    base = ["generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "3"]
    one_line_error(cli(*base, "--draft-model", str(demo_model_path())), "--draft-model",
                   "vocabulary (49152 tokens)", "(32000 tokens)")
    one_line_error(cli(*base, "--kv-bits", "5"), "--kv-bits must be one of 4, 8")
    one_line_error(cli(*base, "--prompt-lookup", "2", "--draft-model", "x"), "exclude")
    ok = cli(*base, "--prompt-lookup", "3", "--temp", "0")
    assert ok.returncode == 0 and "drafts accepted" in ok.stderr, ok.stderr
