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
from mlx_mixtral.generation import ChatSession, Chunk, Stats, stream_generate
from mlx_mixtral.generation.kv import KVSettings
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.speculative import Drafter, LookupDrafter, ModelDrafter
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
    with pytest.raises(GenerationError, match="kv_bits"):  # the parameter (the CLI: its flag)
        KVSettings(5)
    with pytest.raises(GenerationError, match="kv_group_size"):
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


# Drafted sampling is checked against the chain rule in NumPy: the exact probability of each
# sequence of the first DRAFTED tokens under the model's own sampling, compared with how often
# drafted sampling produced it over RUNS seeds (two drafts are proposed and verified in the
# first pass, so acceptance, rejection and the residual all shape the result).
DRAFTED = 3
RUNS = {"sharper": 500, "model": 300, "lookup": 300}  # sharper: where a subtle bias shows
Q_TEMPERATURE, Q_TOP_K = 0.5, 6  # SharperDrafter's q
SAMPLED = SamplingParams(temperature=2.0, top_k=4, top_p=1.0, min_p=0, max_tokens=DRAFTED)


def sampled_distribution(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """What sampling draws from (NumPy): the top_k tokens' log-softmax over temperature."""
    logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    keep = np.argsort(-logprobs)[:top_k]
    x = np.full(logits.shape, -np.inf)
    x[keep] = logprobs[keep] / temperature
    e = np.exp(x - x[keep].max())
    return e / e.sum()


def next_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0, -1].astype(mx.float32), dtype=np.float64)


def exact_sequences(model, prompt: list[int], n: int) -> dict[tuple[int, ...], float]:
    """P(the reply starts with these n tokens), for every sequence sampling can produce."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        longer = {}
        for seq, chance in out.items():
            dist = sampled_distribution(next_logits(model, prompt + list(seq)),
                                        SAMPLED.temperature, SAMPLED.top_k)
            longer.update({(*seq, int(t)): chance * dist[t] for t in np.flatnonzero(dist)})
        out = longer
    return out


def chi_square_limit(df: int, z: float) -> float:
    """The chi-square statistic a true fit exceeds with the normal tail probability of z, by
    Wilson and Hilferty's cube-root approximation (for df >= 3 within 3% of the exact
    quantile, and above it)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def heads(d: dict[tuple[int, ...], float], n: int) -> dict[tuple[int, ...], float]:
    """The same counts or chances for the first n tokens only."""
    out: dict[tuple[int, ...], float] = {}
    for seq, value in d.items():
        out[seq[:n]] = out.get(seq[:n], 0) + value
    return out


def pearson(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float],
            z: float) -> str:
    """"" if the counts fit `exact` by Pearson's test (sequences expected fewer than 5 times
    pooled into one cell), else the statistic and its limit."""
    runs = sum(counts.values())
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for seq, p in exact.items():
        if runs * p >= 5:
            cells.append((counts.get(seq, 0), runs * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(seq, 0), pooled_exp + runs * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    limit = chi_square_limit(len(cells) - 1, z)
    return "" if stat <= limit else f"chi-square {stat:.1f} > {limit:.1f} ({len(cells)} cells)"


def fits(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float]) -> str:
    """"" if the counts fit `exact`, else why not. The first token, the first two and all
    three are each tested (a bias in the first token shows best alone), at 1e-3 in all
    (z = 3.40 each: Bonferroni over three tests)."""
    runs = sum(counts.values())
    impossible = {s: c for s, c in counts.items() if s not in exact}
    if impossible:
        return (f"{sum(impossible.values())} of {runs} replies began with a sequence the model's "
                f"sampling never produces, e.g. {sorted(impossible)[:3]}")
    for n in range(1, DRAFTED + 1):
        why = pearson(heads(counts, n), heads(exact, n), z=3.40)
        if why:
            return f"the first {n} token(s): {why}"
    return ""


class SharperDrafter(Drafter):
    """Proposes from a sharper, wider version of the model's own distribution (top 6 at
    temperature 0.5): q overlaps p but exceeds it on the likeliest token and covers tokens p
    excludes, so acceptance, rejection and the residual max(0, p - q) each matter (sampling
    the residual from p instead fails). Its sampling is NumPy's, seeded per reply."""

    def __init__(self, model, k: int, seed: int, known: dict) -> None:
        self.model, self.k, self.rng = model, k, np.random.RandomState(seed)
        self.known = known  # q by history, shared by the replies (the model is the same)

    def q(self, history: tuple[int, ...]) -> np.ndarray:
        if history not in self.known:
            self.known[history] = sampled_distribution(next_logits(self.model, list(history)),
                                                       Q_TEMPERATURE, Q_TOP_K)
        return self.known[history]

    def propose(self, history):
        tokens, rows = [], []
        for _ in range(self.k):
            q = self.q((*history, *tokens))
            tokens.append(int(self.rng.choice(len(q), p=q)))
            rows.append(q)
        return tokens, mx.array(np.stack(rows).astype(np.float32))


def drafted_counts(model, prompt: list[int], drafter,
                   runs: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(runs):
        stats = run(model, prompt, sampling=SAMPLED, seed=seed, draft=drafter(seed))
        assert stats.draft_proposed >= DRAFTED - 1  # the first pass verified two drafts
        seq = tuple(stats.tokens)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


@pytest.mark.slow  # hundreds of seeded replies per drafter (4-12 s each)
@pytest.mark.parametrize("drafter", ["model", "sharper", "lookup"])
def test_drafted_sampling_keeps_the_distribution(models, drafter):
    """The first three tokens sampled with drafts follow the model's own distribution, from
    the chain rule in NumPy (top-4 at temperature 2: 64 sequences), over RUNS seeds. Drafted
    by the draft model, by SharperDrafter (q overlapping p) and by prompt lookup (no q)."""
    model = models["mistral"]
    prompt = tokens(10)
    prompt += prompt[:3]  # (so prompt lookup proposes: the start repeats)
    known: dict = {}
    shared = ModelDrafter(models["draft"], DRAFTED - 1)  # (keeps its cache between replies)
    make = {"model": lambda seed: shared,
            "sharper": lambda seed: SharperDrafter(model, DRAFTED - 1, seed, known),
            "lookup": lambda seed: LookupDrafter(DRAFTED - 1)}[drafter]
    exact = exact_sequences(model, prompt, DRAFTED)
    assert sum(exact.values()) == pytest.approx(1.0)
    why = fits(drafted_counts(model, prompt, make, RUNS[drafter]), exact)
    assert not why, why


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
    from mlx_mixtral.app.chat_caches import ChatCaches
    from mlx_mixtral.app.engine import Prompt
    from mlx_mixtral.app.mlx_engine import MlxEngine

    folder = tiny_model_folder(tmp_path / "tiny")
    model, tokenizer = load(folder)
    words = " ".join(f"w{i}" for i in range(300))
    session = ChatSession(model, tokenizer, sampling=SamplingParams(temperature=0, max_tokens=40))
    while len(session.cached) < 2000:
        list(session.send(words))
    history = session.messages
    caches = ChatCaches(tmp_path / "caches")
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

    from mlx_mixtral.app.chat_caches import ChatCaches
    from mlx_mixtral.app.engine import Prompt
    from mlx_mixtral.app.mlx_engine import MlxEngine

    caches = ChatCaches(tmp_path / "caches")
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
    from mlx_mixtral.app.chat_caches import ChatCaches

    caches = ChatCaches(tmp_path, budget=250)
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
    from mlx_mixtral.demo import demo_model_path

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


def test_cli_prompt_cache_in_a_folder_is_one_line_before_loading(tiny_folder, tmp_path):
    result = cli("generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "2",
                 "--prompt-cache", str(tmp_path))
    one_line_error(result, "--prompt-cache", str(tmp_path), "folder")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no "Loading" line


def test_cli_prompt_cache_named_without_safetensors_round_trips(tiny_folder, tmp_path):
    path = tmp_path / "cache.bin"
    base = ["generate", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "2",
            "--prompt-cache", str(path)]
    first = cli(*base, "--prompt", "A long document: " + "lorem ipsum " * 20 + "Summarise.")
    assert first.returncode == 0, first.stderr
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no partial file left
    again = cli(*base, "--prompt", "A long document: " + "lorem ipsum " * 20 + "Shorter.")
    assert again.returncode == 0, again.stderr
    assert int(again.stderr.split("Prompt cache: ")[1].split()[0]) >= 40


def test_prompt_cache_api_reads_and_writes_any_file_name(models, tmp_path):
    model = models["mistral"]
    for name in ("cache.bin", "cache", "cache.npz"):
        save_prompt_cache(tmp_path / name, filled(model, 12), model=model, tokens=list(range(12)))
        loaded, meta = load_prompt_cache(tmp_path / name, return_metadata=True, model=model)
        assert meta["tokens"] == list(range(12)) and loaded[0].offset == 12


def test_cli_bad_drafting_and_kv_flags(tiny_folder):
    from mlx_mixtral.demo import demo_model_path

    base = ["generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "3"]
    one_line_error(cli(*base, "--draft-model", str(demo_model_path())), "--draft-model",
                   "vocabulary (49152 tokens)", "(32000 tokens)")
    one_line_error(cli(*base, "--kv-bits", "5"), "--kv-bits must be one of 4, 8")
    one_line_error(cli(*base, "--prompt-lookup", "2", "--draft-model", "x"), "exclude")
    ok = cli(*base, "--prompt-lookup", "3", "--temp", "0")
    assert ok.returncode == 0 and "drafts accepted" in ok.stderr, ok.stderr


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
