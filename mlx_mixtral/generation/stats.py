"""The numbers after a reply, computed in one place for generation, chat and `bench`.

Time to first token covers the prefill (and the first sampled token); decode speed counts the
tokens after the first over the time after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# How far a prompt's prefill has come: called with (tokens done, tokens in all).
Progress = Callable[[int, int], None]


class PrefillStopped(Exception):  # noqa: N818 - a signal, not a failure
    """Raised by a `Progress` callback to stop a long prefill between chunks (the user gave
    up waiting): the chat session ends the turn with an empty, stopped reply."""


@dataclass
class Stats:
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds to the first token
    peak_memory: int  # bytes MLX held at most during the reply (see `PeakMemory`)
    finish_reason: str | None = None
    forward_passes: int = 0  # the model's passes while generating (drafted decoding: fewer)
    draft_proposed: int = 0
    draft_accepted: int = 0
    tokens: list[int] = field(default_factory=list, repr=False)
    text: str = field(default="", repr=False)

    def __str__(self) -> str:
        line = (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
                f"first token {self.ttft:.2f} s | peak memory {self.peak_memory / 1e9:.2f} GB")
        if self.draft_proposed:
            line += (f" | drafts accepted {self.draft_accepted}/{self.draft_proposed}, "
                     f"{self.forward_passes / max(self.generation_tokens, 1):.2f} passes "
                     "per token")
        return line


class Clock:
    """Started when the prompt is handed over; told when the first token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def first_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    @property
    def ttft(self) -> float:
        return (self.first or time.perf_counter()) - self.start

    def stats(self, prompt_tokens: int, tokens: list[int], text: str = "",
              finish_reason: str | None = None, peak_memory: int | None = None) -> Stats:
        """The numbers; `peak_memory` defaults to MLX's process-wide peak (for a caller that
        reset it before the run: `bench`)."""
        import mlx.core as mx

        ttft = self.ttft
        decode_time = max(time.perf_counter() - self.start - ttft, 1e-9)
        generated = len(tokens)
        return Stats(
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tokens / max(ttft, 1e-9),
            generation_tokens=generated,
            generation_tps=(generated - 1) / decode_time if generated > 1 else 0.0,
            ttft=ttft, finish_reason=finish_reason, tokens=tokens, text=text,
            peak_memory=mx.get_peak_memory() if peak_memory is None else peak_memory)


class PeakMemory:
    """The most memory MLX held during one reply, without resetting its process-wide peak
    (other replies, threads and callers read that counter too). When the reply raises the
    process's peak (always, after a caller's own `mx.reset_peak_memory()`), that new peak is
    exact; otherwise the reply stayed below an earlier peak, and the figure is the most held
    between tokens."""

    def __init__(self) -> None:
        import mlx.core as mx

        self.baseline = mx.get_peak_memory()
        self.held = mx.get_active_memory()

    def seen(self) -> None:
        import mlx.core as mx

        self.held = max(self.held, mx.get_active_memory())

    def bytes(self) -> int:
        import mlx.core as mx

        self.seen()
        peak = mx.get_peak_memory()
        return peak if peak > self.baseline else self.held
