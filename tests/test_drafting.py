"""Drafted decoding (a draft model and prompt lookup): token-identical when greedy, and the
sampled distribution kept, against an exact NumPy reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from kv_helpers import build_models, run, tokens

from mlx_mixtral.generation import stream_generate
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.speculative import Drafter, LookupDrafter, ModelDrafter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


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

    # (one sentence, 23 tokens: each token of prompt or reply is a forward pass's worth here)
    passage = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, "
               "carrying a brass lantern and a worn notebook.")
    model, tokenizer = load()
    prompt = f"Repeat this passage exactly, word for word:\n\n{passage}"
    greedy = SamplingParams(temperature=0, min_p=0, max_tokens=24)
    plain = list(stream_generate(model, tokenizer, prompt, sampling=greedy))[-1]
    drafted = list(stream_generate(model, tokenizer, prompt, sampling=greedy,
                                   draft=LookupDrafter(4)))[-1]
    assert drafted.tokens == plain.tokens
    assert passage[:60] in plain.text  # it does repeat the passage
    assert drafted.forward_passes / drafted.generation_tokens <= 0.6
