"""What a loaded model may do at run time, set once by the loader and read by generation.

A model that runs within a memory budget has a shorter context than its config (the KV cache
must fit) and shorter prefill chunks (their working memory must fit); a Mixtral whose experts
are paged has the pager that fills their slots. Without a budget nothing is limited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ModelArgs
    from .expert_cache import ExpertPager

# Prompt tokens per forward pass when the caller names none (mlx-lm's default is 2048; 512
# keeps the prefill's working memory small and its progress visible).
DEFAULT_PREFILL_STEP = 512
# Sequences decoding together in one batch when the caller names no number (the server's
# --decode-concurrency).
DECODE_CONCURRENCY = 8
# A prefill the user may stop (Esc in the chat app) is stopped between chunks, so its chunks are
# kept to about STOP_WITHIN seconds each, from the speed measured on the chunks before; while
# that speed is unknown, a first chunk of PROBE_STEP tokens measures it.
STOP_WITHIN = 1.0
PROBE_STEP = 32
MIN_PREFILL_STEP = 8


@dataclass(frozen=True)
class RuntimeLimits:
    max_context: int | None = None  # a budget's cap on prompt + reply (the KV cache must fit)
    max_prefill_step: int | None = None  # longer prefill chunks would overrun the budget
    memory_plan: Any = None  # the budget's plan (loading/memory_plan.py's MemoryPlan)
    expert_pager: ExpertPager | None = None  # the experts' slots and their reader

    def prefill_step(self, wanted: int | None = None, stoppable: bool = False,
                     seconds_per_token: float | None = None) -> int:
        """The prefill chunk: what the caller wants (or the default), within the budget; for a
        `stoppable` prefill, no longer than STOP_WITHIN at `seconds_per_token` (the speed
        measured so far; None: not yet, so a short first chunk measures it). The one place the
        chunk size is decided."""
        step = wanted or DEFAULT_PREFILL_STEP
        step = min(step, self.max_prefill_step or step)
        if not stoppable:
            return step
        if seconds_per_token is None:
            return min(step, PROBE_STEP)
        return min(step, max(MIN_PREFILL_STEP, int(STOP_WITHIN / max(seconds_per_token, 1e-9))))

    def context(self, args: ModelArgs) -> int:
        """The longest a prompt and its reply may be together."""
        own = args.max_position_embeddings
        return min(own, self.max_context or own)


NO_LIMITS = RuntimeLimits()


def close_model(model: Any) -> None:
    """Let go of what runs beside a model: its expert pager's reader threads and files (a
    paged model's slots go back with the model once nothing else refers to it)."""
    pager = limits_of(model).expert_pager
    if pager is not None:
        pager.close()


def limits_of(model: Any) -> RuntimeLimits:
    """A model's limits; none for a model that has none (any mlx-lm model works too)."""
    limits = getattr(model, "limits", None)
    return limits if isinstance(limits, RuntimeLimits) else NO_LIMITS
