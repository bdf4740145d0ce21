"""A reply as it streams: pieces of text (`Chunk`s), then its end (`Stats`: why it ended, its
numbers, or what failed). One shape for the library's generation, the server's worker and the
chat app; the numbers are computed here for all of them and for `bench`.

Time to first token covers the prefill (and the first sampled token); decode speed counts the
tokens after the first over the time after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..units import count

# How far a prompt's prefill has come: called with (tokens done, tokens in all).
Progress = Callable[[int, int], None]


class PrefillStopped(Exception):  # noqa: N818 - a signal, not a failure
    """Raised by a `Progress` callback to stop a long prefill between chunks (the user gave
    up waiting): the chat session ends the turn with an empty, stopped reply."""


@dataclass
class Chunk:
    """A piece of the reply: its text (maybe "") and token. The last chunk has no token and
    says why the reply ended."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    logprob: float | None = None  # with `logprobs`: the token's log-probability
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely tokens there
    index: int = 0  # which choice of a request with several (`n`)


@dataclass
class Stats:
    """The end of a reply. A failed one has `error` (and the numbers so far, if any)."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    ttft: float = 0.0  # seconds to the first token
    peak_memory: int = 0  # bytes MLX held at most during the reply (see `PeakMemory`)
    finish_reason: str | None = None  # "stop", "length", "stopped" (by the caller), "error"
    forward_passes: int = 0  # the model's passes while generating (drafted decoding: fewer)
    draft_proposed: int = 0
    draft_accepted: int = 0
    tokens: list[int] = field(default_factory=list, repr=False)
    text: str = field(default="", repr=False)
    error: str | None = None  # what failed
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a kept cache
    context_used: int = 0  # tokens a chat's cache holds after the reply
    # Mixtral: the share of the reply's tokens that chose each expert (layers x experts), and
    # the load-balancing loss over the reply (1.0 = even).
    expert_share: list[list[float]] | None = field(default=None, repr=False)
    balance: float | None = None
    index: int = 0  # which choice of a request with several (`n`)

    @classmethod
    def failed(cls, message: str) -> Stats:
        return cls(finish_reason="error", error=message)

    def __str__(self) -> str:
        line = (f"prompt: {count(self.prompt_tokens, 'token')}, {self.prompt_tps:.1f} tok/s | "
                f"generation: {count(self.generation_tokens, 'token')}, "
                f"{self.generation_tps:.1f} tok/s | "
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
