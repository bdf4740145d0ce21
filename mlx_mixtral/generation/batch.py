"""Many prompts answered together: left-padded to one length, decoded as one batch.

On Metal this raises throughput; on the CPU backend a batch costs what its prompts cost one by
one (`bench` reports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from ..errors import GenerationError
from ..model.decoder import Model
from ..text.tokenizer import Tokenizer
from .sampling import Keys, SamplingParams
from .stream import (
    BAD_LOGITS,
    NOT_A_NUMBER,
    check_prompt,
    context_length,
    guard_nan,
    prefill_chunk,
    prompt_ids,
)


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[Any]],
    *,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    system: str | None = None,
    raw: bool = False,
    chat_format: str | None = None,
    prefill_step_size: int | None = None,
    **settings: Any,
) -> list[str]:
    """Replies to many prompts, computed together (left-padded to one length)."""
    params = SamplingParams.from_kwargs(sampling, **settings)
    seqs = [prompt_ids(tokenizer, p, system=system, raw=raw, chat_format=chat_format)
            for p in prompts]
    if not seqs:
        return []
    for ids in seqs:
        check_prompt(model, ids)
    width = max(map(len, seqs))
    pad = [width - len(ids) for ids in seqs]
    padding = mx.array(pad)
    x = mx.array([[tokenizer.eos_id] * p + ids for p, ids in zip(pad, seqs, strict=True)])
    cache = model.make_cache()
    prefill_step_size = prefill_chunk(model, prefill_step_size)
    for i in range(0, width, prefill_step_size):
        logits = model(x[:, i:i + prefill_step_size], cache=cache, padding=padding)
        mx.eval(logits, [c.state for c in cache])
    sampler = guard_nan(params.sampler(model.args.vocab_size, Keys(params.seed)))
    processors = params.logits_processors()
    history = [mx.array(ids) for ids in seqs]
    out: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    max_tokens = min(params.max_tokens, context_length(model) - width)
    for _ in range(max_tokens):
        last = logits[:, -1, :]
        if processors:  # penalties look at each row's own tokens
            rows = [last[b:b + 1] for b in range(len(seqs))]
            for proc in processors:
                rows = [proc(history[b], rows[b]) for b in range(len(seqs))]
            last = mx.concatenate(rows, axis=0)
        tokens = sampler(last - mx.logsumexp(last, axis=-1, keepdims=True))
        sampled = tokens.tolist()
        if NOT_A_NUMBER in sampled:
            raise GenerationError(BAD_LOGITS)
        for b, token in enumerate(sampled):
            if done[b]:
                continue
            out[b].append(token)
            history[b] = mx.concatenate([history[b], mx.array([token])])
            done[b] = token in tokenizer.eos_ids
        if all(done):
            break
        logits = model(tokens[:, None], cache=cache, padding=padding)
    texts = []
    for ids in out:
        text = tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])
        cuts = [text.find(s) for s in stop if s and s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts
