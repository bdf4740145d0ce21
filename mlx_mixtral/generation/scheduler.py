"""Continuous batching: sequences join and leave between forward passes.

Each pass runs every decoding sequence's next token, and chunks of the prompts being prefilled,
packed into one row (`model/packing.py`): each sequence keeps a cache of its own (full or rolling,
quantized or not, maybe continued from a pool), so a sequence joins with its cache as it is and
leaves with it, and nothing is padded, merged or split. (mlx-lm's `BatchGenerator` keeps one
left-padded batch cache instead: its batch caches can carry neither our rolling window nor
quantized keys and values, and a pooled cache would have to be merged into it and extracted
again.)

A prompt is prefilled in chunks of `prefill_step` as `stream_generate` does (all but its last
token, then the last one with the decoding sequences), shortest remaining prompt first and at
most about one chunk per pass, so a long prompt never freezes the streams that are running and
a short request that arrives meanwhile starts first. Per sequence: its own sampling settings and
seed, penalties over its whole token history (the cached prompt included: the same request
gives the same reply cold or warm), a grammar mask, stop strings, logprobs, max tokens and
cancellation. `n` choices share one prefill: the prompt's cache is copied for each choice just
before its last token.

With `keep_every` (a prefix store's block size) a sequence's cache is also given while it runs:
after each prefill chunk and each time decoding completes a block, so a sliding-window cache,
which holds only its last window, never loses a block before the store has it (the store keeps
only what it does not have yet). A pool that keeps whole caches is given them only at the end.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..errors import GenerationError, MlxMixtralError
from ..model.limits import DECODE_CONCURRENCY, limits_of
from ..model.packing import Packed
from .kv import KVSettings
from .prefix import copy_cache
from .sampling import Keys, SamplingParams
from .stats import Chunk, Clock, PeakMemory, Stats
from .stream import (
    BAD_LOGITS,
    NOT_A_NUMBER,
    StopStrings,
    check_prompt,
    context_length,
    guard_nan,
    logprobs_of,
    prefill_chunk,
)


@dataclass
class Request:
    """A prompt to answer (`ids`, all of it), and where its reply goes: `emit` hears each
    choice's `Chunk`s, then its `Stats` (`index` says which of the `n` choices)."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk | Stats], None]
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    grammar: str | None = None  # an llguidance grammar the output must follow
    n: int = 1
    cancelled: threading.Event = field(default_factory=threading.Event)
    left: int = field(default=0, init=False)  # choices that ended

    @property
    def ended(self) -> bool:
        """Whether the scheduler is done with it (every choice ended, or it never started)."""
        return self.left >= self.n


# Where caches come from and go to (a pool or a prefix store): `take(ids)` gives a cache holding
# ids[:k] and k (< len(ids)); `give(tokens, cache)` is handed a cache holding `tokens` (a
# finished sequence's, or with `keep_every` a running one's, which the store copies from).
Take = Callable[[list[int]], tuple[list, int]]
Give = Callable[[list[int], list], None]


class _Sequence:
    """One choice of a request on its way: its cache, the tokens still to feed, its sampler,
    and its reply so far."""

    def __init__(self, scheduler: Scheduler, request: Request, cache: list, cached: int,
                 index: int = 0) -> None:
        self.request, self.cache, self.cached, self.index = request, cache, cached, index
        self.pending = list(request.ids[cached:])  # fed to the model next
        self.history = list(request.ids[:cached])  # fed already (the penalties' history)
        self.prompt_left = len(self.pending)  # prompt tokens not fed yet
        params = request.params
        seed = None if params.seed is None else params.seed + index
        self.sampler = guard_nan(params.sampler(scheduler.vocab_size, Keys(seed)))
        self.processors = params.logits_processors()
        if request.grammar:
            from .grammar import GrammarMask

            self.processors.append(GrammarMask(scheduler.tokenizer, scheduler.vocab_size,
                                               request.grammar, len(request.ids)))
        self.max_tokens = min(params.max_tokens, context_length(scheduler.model)
                              - len(request.ids))
        self.detok = scheduler.tokenizer.detokenizer()
        self.stops = StopStrings(request.stop)
        self.tokens: list[int] = []
        self.forks = 0  # choices still to copy from this one's prefill
        self.text = ""
        self.clock, self.peak = Clock(), PeakMemory()

    @property
    def decoding(self) -> bool:
        """Whether the next pass samples this sequence's next token."""
        return len(self.pending) == 1

    def fed(self, count: int) -> None:
        self.history += self.pending[:count]
        self.prompt_left = max(0, self.prompt_left - count)
        del self.pending[:count]

    def emit(self, item: Chunk | Stats) -> None:
        item.index = self.index
        self.request.emit(item)

    def add(self, token: int, row: mx.array, eos: frozenset[int]) -> bool:
        """Take a sampled token; whether the reply ended."""
        self.clock.first_token()
        self.peak.seen()
        self.tokens.append(token)
        if token in eos:
            return self.finish("stop")
        shown, hit = self.stops.feed(self.detok.add_token(token))
        self.text += shown
        self.emit(Chunk(shown, token, None, *logprobs_of(row, token, self.request.logprobs)))
        if hit:
            return self.finish("stop", hit=True)
        if len(self.tokens) >= self.max_tokens:
            return self.finish("length")
        self.pending = [token]
        return False

    def finish(self, finish: str, hit: bool = False) -> bool:
        rest = ""
        if not hit:
            rest, hit = self.stops.feed(self.detok.finalize())
            rest += "" if hit else self.stops.flush()
            finish = "stop" if hit else finish
        self.text += rest
        self.emit(Chunk(rest, None, finish))
        stats = self.clock.stats(len(self.request.ids) - self.cached, self.tokens, self.text,
                                 finish, self.peak.bytes())
        stats.forward_passes, stats.cached_tokens = len(self.tokens), self.cached
        self.emit(stats)
        return True


class Scheduler:
    """The batch: `add` requests (any thread), `step()` one forward pass (the model's thread).

    `capacity` sequences run at most (prefilling or decoding); the others wait in order.
    Within a memory budget, the KV caches of the running sequences may together reach the
    budget's context at most (each counted at its prompt plus its longest reply), so that a
    batch holds no more KV than one request could. `forward_calls` counts the model's
    passes."""

    def __init__(self, model: Any, tokenizer: Any, *, kv: KVSettings | None = None,
                 prefill_step: int | None = None, capacity: int = DECODE_CONCURRENCY,
                 take: Take | None = None, give: Give | None = None,
                 keep_every: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.args.vocab_size
        self.kv = kv or KVSettings()
        self.kv.check(model.args.head_dim)
        self.prefill_step = prefill_chunk(model, prefill_step)
        self.capacity = capacity
        # KV positions the running sequences may reach together (None: no memory budget).
        self.kv_room = context_length(model) if limits_of(model).memory_plan is not None \
            else None
        self.take = take or (lambda ids: (model.make_cache(), 0))
        self.give = give
        self.keep_every = keep_every if give is not None else None
        self.queue: deque[Request] = deque()
        self.active: list[_Sequence] = []
        self.forward_calls = 0
        self.served = 0  # requests ended
        self._lock = threading.Lock()

    # ---- the batch's state --------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def busy(self) -> bool:
        return bool(self.active or self.queue)

    def add(self, request: Request) -> None:
        """Queue `request` (checked: a prompt that does not fit raises GenerationError)."""
        check_prompt(self.model, request.ids)
        if request.n < 1:
            raise GenerationError("n must be at least 1")
        with self._lock:
            self.queue.append(request)

    def cancel_all(self, why: str | None = None) -> None:
        """End every sequence and waiting request now (`why`: told to each, as an error)."""
        with self._lock:
            waiting, self.queue = list(self.queue), deque()
        for request in waiting:
            request.cancelled.set()
            self._end(request)
            if why:
                request.emit(Stats.failed(why))
        for seq in self.active:
            seq.request.cancelled.set()
        self._leave([s for s in self.active], why)

    # ---- one pass -----------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit waiting requests, run one forward pass, sample; False when there was nothing
        to do."""
        self._leave([s for s in self.active if s.request.cancelled.is_set()])
        self._admit()
        self._fork_ready()
        if not self.active:
            return False
        batch = [(s, 1) for s in self.active if s.decoding] + self._prefill_chunks()
        logits = self.model(mx.array([t for s, n in batch for t in s.pending[:n]])[None],
                            cache=Packed([n for _, n in batch], [s.cache for s, _ in batch]))
        self.forward_calls += 1
        sampled, failed, prefilled, grown = [], [], [], []
        for row, (seq, n) in enumerate(batch):
            was_decoding = seq.decoding
            seq.fed(n)
            if self._completes_block(seq, n):
                grown.append(seq)
            self._maybe_quantize(seq)
            if not was_decoding:
                prefilled += [c.state for c in seq.cache]
                continue
            try:
                sampled.append((seq, *self._sample(seq, logits[:, row])))
            except MlxMixtralError as e:  # (a grammar that refused): this sequence alone fails
                seq.emit(Stats.failed(str(e)))
                failed.append(seq)
        self._leave(failed, keep=False)
        mx.eval([t for _, t, _ in sampled], prefilled)  # (a prefill's cache, computed now)
        for seq in grown:
            if seq not in failed:
                self.give(seq.history[:seq.cache[0].offset], seq.cache)
        ended = []
        for seq, token, row in sampled:
            token = token.item()
            if token == NOT_A_NUMBER:
                raise GenerationError(BAD_LOGITS)
            if seq.add(token, row, self.tokenizer.eos_ids):
                ended.append(seq)
        self._leave(ended)
        return True

    def _prefill_chunks(self) -> list[tuple[_Sequence, int]]:
        """(sequence, tokens) of this pass's prefill: whole chunks (as `stream_generate` cuts
        them), shortest remaining prompt first, as many as fit one chunk (at least one)."""
        chunks, total = [], 0
        for seq in sorted((s for s in self.active if not s.decoding),
                          key=lambda s: len(s.pending)):
            n = min(self.prefill_step, len(seq.pending) - 1)
            if chunks and total + n > self.prefill_step:
                break
            chunks.append((seq, n))
            total += n
        return chunks

    def _completes_block(self, seq: _Sequence, n: int) -> bool:
        """Whether the `n` tokens just fed completed a block the store should copy now."""
        if self.keep_every is None:
            return False
        end = seq.cache[0].offset
        return end // self.keep_every > (end - n) // self.keep_every

    def _sample(self, seq: _Sequence, logits: mx.array) -> tuple[mx.array, mx.array]:
        """(token, log-probabilities) for one sequence's row, as mlx-lm's `generate_step`
        samples: logits processors over its whole history, then the sampler."""
        if seq.processors:
            history = mx.array(seq.history)
            for processor in seq.processors:
                logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return seq.sampler(logprobs), logprobs.squeeze(0)

    def _maybe_quantize(self, seq: _Sequence) -> None:
        """mlx-lm's `maybe_quantize_kv_cache`, per sequence."""
        kv = self.kv
        if kv.bits is not None and seq.cache[0].offset >= kv.start:
            seq.cache = [c.to_quantized(group_size=kv.group_size, bits=kv.bits)
                         for c in seq.cache]

    # ---- joining and leaving --------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            with self._lock:
                running = sum(1 + s.forks for s in self.active)  # (choices to come too)
                if not self.queue or (self.active and
                                      (running + self.queue[0].n > self.capacity
                                       or not self._fits(self.queue[0]))):
                    return
                request = self.queue.popleft()
            if request.cancelled.is_set():
                self._end(request)
                continue
            try:
                self._start(request)
            except MlxMixtralError as e:
                self._end(request)
                request.emit(Stats.failed(str(e)))

    def _reach(self, request: Request) -> int:
        """The KV positions one choice of `request` may hold: its prompt and longest reply."""
        return min(len(request.ids) + request.params.max_tokens, context_length(self.model))

    def _fits(self, request: Request) -> bool:
        """Whether `request` may join now without the batch's KV outgrowing the budget."""
        if self.kv_room is None:
            return True
        held = sum((1 + s.forks) * self._reach(s.request) for s in self.active)
        return held + request.n * self._reach(request) <= self.kv_room

    def _end(self, request: Request) -> None:
        request.left = request.n
        self.served += 1

    def _start(self, request: Request) -> None:
        cache, cached = self.take(request.ids)
        first = _Sequence(self, request, cache, cached)
        first.forks = request.n - 1
        self.active.append(first)

    def _fork_ready(self) -> None:
        """The other choices of a request share its first sequence's prefill: once that one
        has only the prompt's last token left, each choice gets a copy of its cache and joins
        there."""
        for first in [s for s in self.active if s.forks and s.decoding]:
            for index in range(1, first.forks + 1):
                seq = _Sequence(self, first.request, copy_cache(first.cache),
                                len(first.request.ids) - 1, index)
                seq.cached = first.cached
                self.active.append(seq)
            first.forks = 0

    def _leave(self, ended: Sequence[_Sequence], why: str | None = None,
               keep: bool = True) -> None:
        """Sequences out of the batch; their caches go back (`give`), holding what was fed
        (not after a failure: `why`)."""
        keep = keep and why is None
        for seq in ended:
            self.active.remove(seq)
            request = seq.request
            request.left += 1 + seq.forks  # (choices never forked end with it)
            if request.ended:
                self.served += 1
            if why:
                seq.emit(Stats.failed(why))
            if keep and self.give is not None:
                self.give(seq.history[:seq.cache[0].offset], seq.cache)
