"""Drafted decoding: cheap guesses of the next tokens, checked by the model in one pass.

A drafter proposes up to k tokens; the model runs once over the last token and the k guesses,
and keeps the guesses its own sampling agrees with, plus one token of its own. For greedy
decoding the output is token for token what plain decoding gives; when sampling, the accepted
tokens follow the model's own distribution (speculative sampling: a guess x is kept with
probability min(1, p(x) / q(x)), a rejected one is replaced by a sample of max(0, p - q)).

Two drafters:
- `ModelDrafter`: a small model with the same vocabulary, with its own KV cache.
- `LookupDrafter`: the tokens that followed the latest earlier occurrence of the text's last
  n-gram (prompt lookup, as llama.cpp has it): no second model; it pays when the reply repeats
  its input (code edits, quoting, extraction).

On this CPU a pass over k+1 tokens costs about k+1 single steps, so the gain shows on Metal;
here the honest figure is the model's forward passes per generated token (`Stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..errors import GenerationError
from ..model.decoder import Model
from .kv import KVSettings
from .prefix import reuse_prefix
from .sampling import Keys, SamplingParams
from .stats import Progress


@dataclass
class DraftCounts:
    """What drafting did, for `Stats` and `bench`."""

    proposed: int = 0
    accepted: int = 0
    forward_passes: int = 0  # the model's, not the drafter's


class Drafter:
    """Proposes the next tokens of `history`; `q` (their distributions) when it has them."""

    k: int

    def propose(self, history: Sequence[int]) -> tuple[list[int], mx.array | None]:
        raise NotImplementedError

    def accepted(self, history: Sequence[int]) -> None:
        """`history` is now what the model has accepted (a drafter may drop the rest)."""


class LookupDrafter(Drafter):
    """Prompt lookup: continue the latest earlier occurrence of the last n-gram."""

    def __init__(self, k: int, max_ngram: int = 3) -> None:
        if k < 1:
            raise GenerationError(f"prompt_lookup must be at least 1, got {k}",
                                  params=("prompt_lookup",))
        self.k, self.max_ngram = k, max_ngram

    def propose(self, history: Sequence[int]) -> tuple[list[int], mx.array | None]:
        tokens = list(history)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + self.k]
                    if follow:
                        return follow, None
        return [], None


class ModelDrafter(Drafter):
    """A small model with the same vocabulary proposes k tokens, one step at a time."""

    def __init__(self, model: Model, k: int, sampling: SamplingParams | None = None) -> None:
        if k < 1:
            raise GenerationError(f"num_draft_tokens must be at least 1, got {k}",
                                  params=("num_draft_tokens",))
        # Proposals follow the model's own sampling settings (set for each reply).
        self.model, self.k = model, k
        self.sampling = sampling or SamplingParams(temperature=0)
        self.keys: Keys | None = None  # the reply's random keys (set with `sampling`)
        self.cache = model.make_cache(slack=k)
        self.seen: list[int] = []  # the tokens in the draft cache
        self.prefill_step = 512  # tokens per pass when catching up (the model's, when drafting)

    def _sync(self, history: Sequence[int]) -> None:
        self.cache, common = reuse_prefix(self.cache, self.seen, history,
                                          lambda: self.model.make_cache(slack=self.k))
        new = list(history[common:])
        # In chunks, as the model prefills: a whole prompt at once could outgrow a budget.
        for start in range(0, len(new), self.prefill_step):
            self._logits = self.model(mx.array([new[start:start + self.prefill_step]]),
                                      cache=self.cache)[0, -1]
            if start + self.prefill_step < len(new):
                mx.eval(self._logits)
        self.seen = [*self.seen[:common], *new]

    def propose(self, history: Sequence[int]) -> tuple[list[int], mx.array | None]:
        self._sync(history)
        tokens, dists = [], []
        logits = self._logits
        for i in range(self.k):
            probs = self.sampling.distribution(logits)
            token = pick(probs, self.sampling, self.keys)
            tokens.append(token)
            dists.append(probs)
            if i + 1 < self.k:
                logits = self.model(mx.array([[token]]), cache=self.cache)[0, -1]
                self.seen.append(token)
        return tokens, mx.stack(dists)

    def accepted(self, history: Sequence[int]) -> None:
        pass  # the next `propose` trims the draft cache to the common prefix


def pick(probs: mx.array, sampling: SamplingParams, keys: Keys | None = None) -> int:
    """The token `probs` gives: its argmax when greedy, else a sample."""
    if sampling.temperature == 0:
        return int(mx.argmax(probs).item())
    key = keys.next() if keys is not None else None
    return int(mx.random.categorical(mx.log(probs), key=key).item())


def verify(logits: mx.array, drafts: list[int], q: mx.array | None,
           sampling: SamplingParams, keys: Keys | None = None) -> list[int]:
    """The tokens the model keeps: the accepted prefix of `drafts`, then one of its own.
    logits[i] is the model's next-token distribution after drafts[:i]."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        p = sampling.distribution(logits[i])
        if sampling.temperature == 0:
            token = int(mx.argmax(p).item())
            out.append(token)
            if token != d:
                return out
            continue
        q_d = 1.0 if q is None else float(q[i, d].item())
        key = keys.next() if keys is not None else None
        if mx.random.uniform(key=key).item() < min(1.0, float(p[d].item()) / max(q_d, 1e-30)):
            out.append(d)
            continue
        guess = q[i] if q is not None else (mx.arange(p.shape[-1]) == d).astype(p.dtype)
        residual = mx.maximum(p - guess, 0)
        total = float(residual.sum().item())
        out.append(pick(residual / total, sampling, keys) if total > 0
                   else pick(p, sampling, keys))
        return out
    out.append(pick(sampling.distribution(logits[len(drafts)]), sampling, keys))
    return out


def check_draft_planned(model: Model, drafter: Drafter) -> None:
    """Within a memory budget the plan must count the drafting (`load(..., draft=)`): a draft
    model, or more drafted tokens, than it holds would overrun the budget unnoticed."""
    plan = model.limits.memory_plan
    if plan is None:
        return
    planned = plan.draft
    model_drafts = isinstance(drafter, ModelDrafter)
    if planned is None or planned.tokens < drafter.k or (model_drafts and planned.args is None):
        what = "a draft model" if model_drafts else "prompt lookup"
        raise GenerationError(
            f"drafting {drafter.k} tokens with {what} was not counted in this model's memory "
            f"budget: load it with draft=draft_needs({drafter.k}"
            f"{', draft_model' if model_drafts else ''}) (mlx_mixtral.loading)",
            params=("max_memory",))


def check_cache_slack(cache: list, k: int) -> None:
    short = [c for c in cache if getattr(c, "slack", k) < k]
    if short:
        raise GenerationError(f"drafting {k} tokens needs a cache with slack for them; make it "
                              f"with model.make_cache(slack={k})")


def speculative_steps(model: Callable[..., mx.array], prompt: list[int], cache: list,
                      drafter: Drafter, sampling: SamplingParams, keys: Keys, max_tokens: int,
                      kv: KVSettings, counts: DraftCounts, prefill_step_size: int,
                      progress: Progress | None = None) -> Iterator[int]:
    """Tokens as they are accepted (the first after the prompt's prefill); `model`: the
    model's forward pass."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    check_cache_slack(cache, drafter.k)
    if isinstance(drafter, ModelDrafter):
        drafter.sampling, drafter.keys = sampling, keys
        drafter.prefill_step = prefill_step_size
    processors = sampling.logits_processors()
    for start in range(0, len(prompt) - 1, prefill_step_size):  # all but the last token
        model(mx.array([prompt[start:min(start + prefill_step_size, len(prompt) - 1)]]),
              cache=cache)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(start + prefill_step_size, len(prompt) - 1), len(prompt))
    history = list(prompt)
    last = prompt[-1]  # accepted, not yet run through the model
    produced = 0
    while produced < max_tokens:
        drafts, q = drafter.propose(history)
        drafts = drafts[:max(0, min(drafter.k, max_tokens - produced - 1))]
        q = None if q is None else q[:len(drafts)]
        logits = model(mx.array([[last, *drafts]]), cache=cache)[0].astype(mx.float32)
        counts.forward_passes += 1
        counts.proposed += len(drafts)
        if processors:
            rows = []
            for i in range(len(drafts) + 1):
                row = logits[i:i + 1]
                seen = mx.array(history + drafts[:i])
                for proc in processors:
                    row = proc(seen, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if mx.isnan(logits).any().item():
            raise GenerationError("the model's output is not a number (NaN or inf logits): "
                                  "its weights are probably corrupt")
        kept = verify(logits, drafts, q, sampling, keys)
        accepted = len(kept) - 1
        counts.accepted += accepted
        rejected = len(drafts) - accepted
        if rejected:
            for c in cache:
                c.trim(rejected)
        maybe_quantize_kv_cache(cache, kv.start, kv.group_size, kv.bits)
        history += kept
        drafter.accepted(history)
        last = kept[-1]
        for token in kept:
            produced += 1
            yield token
            if produced >= max_tokens:
                return
