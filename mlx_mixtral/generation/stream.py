"""Text generation: streaming, stop strings, statistics, and batches of prompts.

The token loop is mlx-lm's `generate_step` (chunked prefill, pipelined decoding with
`mx.async_eval`, its samplers); this module adds prompts in any form, streaming text that never
breaks a character, stop strings, and the numbers a user wants after a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import mlx.core as mx

from ..errors import GenerationError
from ..model.decoder import Model
from ..model.limits import limits_of
from ..model.routing import RouterTrace
from ..text.chat_format import clean_text
from ..text.tokenizer import Tokenizer
from .kv import KVSettings, kv_settings
from .sampling import Keys, SamplingParams
from .speculative import DraftCounts, Drafter, check_draft_planned, speculative_steps
from .stats import Chunk, Clock, PeakMemory, Progress, Stats


def settle() -> None:
    """Wait for all queued MLX work of this thread: the default stream and mlx-lm's (thread
    local) generation stream, where its pipelined next step may still run. A process that
    ends, or a cache that is kept, while that work is in flight can abort or go stale."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def require_text(prompt: str) -> None:
    """Refuse an empty prompt (checked before a model loads, where the caller can)."""
    if not prompt.strip():
        raise GenerationError("the prompt is empty")


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[Any], system: str | None = None,
               raw: bool = False, chat_format: str | None = None) -> list[int]:
    """Token ids for a plain string (chat-formatted unless `raw`), a message list, or ids."""
    if isinstance(prompt, str):
        require_text(prompt)
        if raw:  # (the chat formats clean message text themselves)
            return tokenizer.encode(clean_text(prompt), add_bos=tokenizer.add_bos)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, chat_format=chat_format)
    prompt = list(prompt)
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    messages = prompt
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, chat_format=chat_format)


def context_length(model: Model) -> int:
    """The longest a prompt and its reply may be: the model's context, or less when a memory
    budget caps its KV cache (any mlx-lm model works too)."""
    return limits_of(model).context(model.args)


def prefill_chunk(model: Any, wanted: int | None = None, stoppable: bool = False,
                  seconds_per_token: float | None = None) -> int:
    """The prefill chunk for `model`: `wanted` (or the default), smaller when a memory budget
    says so or when the prefill may be stopped (model/limits.py decides; any mlx-lm model works
    too)."""
    return limits_of(model).prefill_step(wanted, stoppable, seconds_per_token)


def forward_pass(model: Model, router_trace: RouterTrace | None) -> Callable[..., mx.array]:
    """The model's forward pass as the token loops call it: recording the MoE routing of
    every pass in `router_trace`, when one is given."""
    return model if router_trace is None else partial(model, router_trace=router_trace)


def check_prompt(model: Model, ids: Sequence[int], already_cached: int = 0) -> None:
    if not ids:
        raise GenerationError("the prompt is empty")
    total, limit = already_cached + len(ids), context_length(model)
    if total >= limit:
        what = "the model's context" if limit == model.args.max_position_embeddings else \
            "the context that fits the memory budget"
        raise GenerationError(f"the prompt is {total} tokens, and {what} is {limit}; shorten it")
    bad = [t for t in ids if not 0 <= t < model.args.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the vocabulary "
                              f"(size {model.args.vocab_size})")


NOT_A_NUMBER = -1  # the token a guarded sampler returns for NaN/inf logits
BAD_LOGITS = ("the model's output is not a number (NaN or inf logits): its weights are "
              "probably corrupt; download or convert the model again")


def guard_nan(sampler: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
    """`sampler`, returning NOT_A_NUMBER where the log-probabilities hold NaN (NaN or inf
    logits). Checked inside the step's graph: a separate check would sync every token."""

    def sample(logprobs: mx.array) -> mx.array:
        bad = mx.isnan(logprobs).any(axis=-1)
        return mx.where(bad, NOT_A_NUMBER, sampler(logprobs).astype(mx.int32))

    return sample


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts at a complete one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was hit)."""
        self.held += piece
        hits = [(self.held.find(s), s) for s in self.stops if s in self.held]
        if hits:
            at = min(hits)[0]
            out, self.held = self.held[:at], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[Any],
    *,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    system: str | None = None,
    raw: bool = False,
    chat_format: str | None = None,
    cache: list | None = None,
    history: Sequence[int] = (),
    prefill_step_size: int | None = None,
    kv: KVSettings | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
    quantized_kv_start: int | None = None,
    draft: Drafter | None = None,
    progress: Progress | None = None,
    processors: Sequence[Callable[[mx.array, mx.array], mx.array]] = (),
    logprobs: int | None = None,
    router_trace: RouterTrace | None = None,
    **settings: Any,
) -> Iterator[Chunk | Stats]:
    """Yield `Chunk`s as the reply streams, then one `Stats`.

    `prompt`: text (formatted with the model's chat format unless `raw`), a list of
    {"role", "content"} messages, or token ids. Sampling: a `SamplingParams` and/or its fields
    as keywords (temperature, top_p, top_k, min_p, repetition_penalty, repetition_context,
    max_tokens, seed). `cache`: a KV cache holding earlier tokens, which are not prefilled again;
    `history`: those tokens (the penalties count them, as they would a prompt read afresh).
    `kv`: quantized keys and values (`KVSettings`), or mlx-lm's `kv_bits`, `kv_group_size` and
    `quantized_kv_start` (not both). `draft`: a `Drafter` (a draft model or
    prompt lookup) for drafted decoding. `progress(done, total)` hears how far the prompt's
    prefill has come, after each chunk. `processors`: more logits processors (mlx-lm's
    signature), after the sampling ones: a grammar's mask, say. `logprobs`: give each chunk its
    token's log-probability and this many most likely alternatives. `prefill_step_size`:
    prompt tokens per forward pass (default 512; less within a memory budget).
    `router_trace`: a `RouterTrace` that records which experts each forward pass chose."""
    params = SamplingParams.from_kwargs(sampling, **settings)
    ids = prompt_ids(tokenizer, prompt, system=system, raw=raw, chat_format=chat_format)
    check_prompt(model, ids, cache[0].offset if cache else 0)
    kv = kv_settings(kv, kv_bits, kv_group_size, quantized_kv_start)
    kv.check(model.args.head_dim)
    prefill_step_size = prefill_chunk(model, prefill_step_size)
    keys = Keys(params.seed)
    cache = cache if cache is not None else model.make_cache(slack=draft.k if draft else 0)
    max_tokens = min(params.max_tokens, context_length(model) - cache[0].offset - len(ids))

    detok = tokenizer.detokenizer()
    stops = StopStrings(stop)
    tokens: list[int] = []
    text, finish, hit = "", None, False
    peak = PeakMemory()
    clock = Clock()
    counts = DraftCounts()
    forward = forward_pass(model, router_trace)
    if draft is None:
        steps = _plain_steps(model, forward, ids, cache, params, keys, max_tokens, kv,
                             prefill_step_size, progress, processors, history)
    else:
        if processors or logprobs is not None:
            raise GenerationError("drafted decoding takes no logits processors or logprobs")
        check_draft_planned(model, draft)
        steps = _without_logprobs(speculative_steps(
            forward, ids, cache, draft, params, keys, max_tokens, kv, counts, prefill_step_size,
            progress))
    try:
        for token, row in steps:
            clock.first_token()
            peak.seen()
            tokens.append(token)
            if token in tokenizer.eos_ids:
                finish = "stop"
                break
            shown, hit = stops.feed(detok.add_token(token))
            text += shown
            yield Chunk(shown, token, None, *logprobs_of(row, token, logprobs))
            if hit:
                finish = "stop"
                break
            if len(tokens) >= max_tokens:
                break
    finally:
        steps.close()
    rest = ""
    if not hit:
        rest, hit = stops.feed(detok.finalize())
        rest += "" if hit else stops.flush()
    text += rest
    finish = finish or ("stop" if hit else "length")
    yield Chunk(rest, None, finish)
    stats = clock.stats(len(ids), tokens, text, finish, peak.bytes())
    stats.forward_passes = counts.forward_passes if draft else len(tokens)
    stats.draft_proposed, stats.draft_accepted = counts.proposed, counts.accepted
    yield stats


def _without_logprobs(tokens: Iterator[int]) -> Iterator[tuple[int, None]]:
    try:
        for token in tokens:
            yield token, None
    finally:
        tokens.close()


def logprobs_of(row: mx.array | None, token: int,
                 top: int | None) -> tuple[float | None, list[tuple[int, float]] | None]:
    if row is None or top is None:
        return None, None
    best = mx.argsort(-row)[:top].tolist() if top else []
    values = row.tolist() if len(best) > 8 else None  # one transfer instead of many
    at = (lambda i: values[i]) if values is not None else (lambda i: row[i].item())
    return at(token), [(i, at(i)) for i in best]


def _plain_steps(model: Model, forward: Callable[..., mx.array], ids: list[int], cache: list,
                 params: SamplingParams, keys: Keys, max_tokens: int, kv: KVSettings,
                 prefill_step_size: int, progress: Progress | None = None,
                 processors: Sequence[Callable] = (), history: Sequence[int] = ()
                 ) -> Iterator[tuple[int, mx.array]]:
    """mlx-lm's token loop (chunked prefill, pipelined decoding, its KV quantization) over
    `forward` (the model's pass): (token, its row of log-probabilities)."""
    from mlx_lm.generate import generate_step  # (imports transformers: not at import time)

    steps = generate_step(mx.array(ids), forward, max_tokens=max_tokens,
                          sampler=guard_nan(params.sampler(model.args.vocab_size, keys)),
                          logits_processors=params.logits_processors(history) + list(processors),
                          prompt_cache=cache, prefill_step_size=prefill_step_size,
                          prompt_progress_callback=progress, **kv.step_kwargs())
    try:
        for token, row in steps:
            if int(token) == NOT_A_NUMBER:
                raise GenerationError(BAD_LOGITS)
            yield int(token), row
    finally:
        steps.close()


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[Any],
             **kwargs: Any) -> str:
    """The whole reply as text (see `stream_generate` for the arguments)."""
    for item in stream_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(item, Stats):
            return item.text
    return ""
