"""Many prompts answered together, on the continuous-batching scheduler (scheduler.py).

On Metal this raises throughput; on the CPU backend a batch costs what its prompts cost one by
one (`bench` reports it), but takes far fewer forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model.decoder import Model
from ..text.tokenizer import Tokenizer
from .sampling import SamplingParams
from .scheduler import Request, Scheduler
from .stats import Stats
from .stream import prompt_ids


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
    """Replies to many prompts, computed together (each as `generate` would alone)."""
    params = SamplingParams.from_kwargs(sampling, **settings)
    seqs = [prompt_ids(tokenizer, p, system=system, raw=raw, chat_format=chat_format)
            for p in prompts]
    scheduler = Scheduler(model, tokenizer, prefill_step=prefill_step_size,
                          capacity=max(1, len(seqs)))
    ends: dict[int, Stats] = {}

    def hear(i: int):
        def emit(item: Any) -> None:
            if isinstance(item, Stats):
                ends[i] = item
        return emit

    for i, ids in enumerate(seqs):
        scheduler.add(Request(ids, params, hear(i), stop=list(stop)))
    while scheduler.step():
        pass
    for stats in ends.values():
        if stats.error is not None:
            from ..errors import GenerationError

            raise GenerationError(stats.error)
    return [ends[i].text for i in range(len(seqs))]
