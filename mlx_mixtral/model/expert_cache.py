"""Experts paged into a few slots per layer, for a model larger than its memory budget.

Each MoE layer keeps `slots` experts in fixed arrays (an `ExpertsGLU` of `slots` experts,
allocated once). Its router runs, the layer syncs once to learn which experts its tokens chose,
experts that are not in a slot are read into the least recently used slots that this pass does
not need, and the slot arrays are then computed on exactly as the full table would be (the
expert ids are mapped to slot ids). The reading itself is a loader's job (`ExpertLoader`, in
loading/expert_files.py): it writes straight into the slot arrays, so a miss allocates nothing.

- Reads: a pool of `read_threads` reader threads. A layer's misses are read together, each
  expert cut into pieces the threads read at once (flash is fast with several reads in
  flight), and waited for; they go ahead of any prefetch still queued. With one thread, misses
  are read in turn on the calling thread (the reads before the pool: the benchmark's baseline).
- Prefetch: while a layer's sync waits for MLX, the next layer's router is applied to this
  layer's input (mixtral-offloading's guess; the residual stream changes little between
  layers), and the guessed experts are read by the pool so that reading overlaps computing.
  The next layer waits for the reads of the guessed experts it needs; a wrong guess's reads
  that have not finished are withdrawn (cancelled, their slots given back), so that they cost
  neither bytes nor a wait (on cold reads, where reading is slower than computing).
- Prefill: a chunk may need more experts than a layer has slots. They are then taken in
  groups of `slots`, the ones already resident first; each group's (token, expert) pairs are
  computed and added up before the next group overwrites the slots. Every needed expert is
  read once per layer per chunk.
- A slot's arrays are written only after MLX has finished every computation reading them: the
  layer's sync evaluates everything before it, including this layer in the previous pass.
- Every decision (which slots, which evictions, which prefetches) is made in
  `ExpertPager.begin` and `fill`, from the expert ids alone: a recorded routing trace replays
  through them without the model and gets the live hit rates (routing_trace.py). The stats
  count, per layer, how many needed experts the guess had predicted.
"""

from __future__ import annotations

import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError
from ..threads import MlxPool
from .moe import ExpertsGLU
from .routing import RouterRecord, route

POLICIES = ("lru", "lfu")
# Reader threads: measured on this machine's disk (README, expert paging) and an SSD's wish for
# several reads in flight; MAX_READ_THREADS bounds --read-threads.
DEFAULT_READ_THREADS = 8
MAX_READ_THREADS = 64


class ExpertLoader(Protocol):
    """Reads experts into slots. A loader may also offer `pieces(layer, expert, slot, parts)`:
    the same reads as callables (each returning its bytes) cut for up to `parts` threads;
    without it the pool reads each expert whole with `load`."""

    def load(self, layer: int, expert: int, slot: int) -> int:
        """Read one expert's weights into slot `slot` of layer `layer`; the bytes read."""
        ...

    def close(self) -> None: ...


def check_read_threads(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_READ_THREADS:
        raise ConfigError(f"read_threads must be a whole number from 1 to {MAX_READ_THREADS}, "
                          f"got {n!r}", params=("read_threads",))
    return n


class PassRecorder(Protocol):
    def layer(self, layer: int, chosen: np.ndarray, guess: np.ndarray | None) -> None:
        """One layer's routing in a forward pass, and its guess of the next layer's."""
        ...


class ExpertSlots:
    """Which expert sits in which slot of one layer. Eviction takes the least recently used
    expert ("lru") or the least used one so far ("lfu", recency breaking ties)."""

    def __init__(self, num_experts: int, num_slots: int, policy: str = "lru") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}; choose one of "
                             f"{', '.join(POLICIES)}")
        self.policy = policy
        self.num_slots = num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.where: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
        self.uses: Counter[int] = Counter()
        self.table = np.zeros(num_experts, np.int32)  # expert -> slot (valid where resident)
        self.evicted: dict[int, int] = {}  # slot -> the expert the last `place` evicted there

    def resident(self, expert: int) -> bool:
        return expert in self.where

    def _victim(self, keep: set[int]) -> int:
        candidates = [e for e in self.where if e not in keep]
        if self.policy == "lfu":  # ties: the least recently used (earlier in `where`)
            return min(candidates, key=lambda e: self.uses[e])
        return candidates[0]

    def place(self, experts: Iterable[int], keep: set[int] | None = None
              ) -> list[tuple[int, int]]:
        """Give every expert of `experts` a slot, evicting none of `experts` or `keep`; the
        (expert, slot) pairs that must now be read."""
        experts = list(experts)
        keep = set(experts) | (keep or set())
        reads = []
        for e in experts:
            if e not in self.where:
                if self.free:
                    slot = self.free.pop()
                    self.evicted.pop(slot, None)
                else:
                    victim = self._victim(keep)
                    slot = self.where.pop(victim)
                    self.evicted[slot] = victim
                self.where[e] = slot
                self.table[e] = slot
                reads.append((e, slot))
        return reads

    def withdraw(self, expert: int, intact: bool) -> None:
        """Take back `expert`'s placement, whose read did not finish: with the slot `intact`
        (no byte of it read), the expert it evicted is back, as least recently used; else the
        slot is free."""
        slot = self.where.pop(expert)
        victim = self.evicted.pop(slot, None)
        if intact and victim is not None:
            self.where[victim] = slot
            self.where.move_to_end(victim, last=False)
            self.table[victim] = slot
        else:
            self.free.append(slot)

    def touch(self, experts: Iterable[int]) -> None:
        for e in experts:
            self.where.move_to_end(e)
            self.uses[e] += 1


@dataclass
class LayerStats:
    needed: int = 0  # experts needed, counted once per layer per forward pass
    hits: int = 0  # of those, already in a slot (prefetched ones included)
    prefetch_hits: int = 0  # in a slot because the prefetch read it
    guessable: int = 0  # needed in passes where the previous layer guessed this one's experts
    guessed: int = 0  # of those, among the guessed experts (read by the guess or resident)
    reads: int = 0  # experts read (misses and prefetches)
    withdrawn: int = 0  # guessed experts not needed whose reads were withdrawn unfinished
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 1.0

    @property
    def guess_rate(self) -> float | None:
        """The share of needed experts the guess had predicted; None where nothing guessed
        (the first layer, or no prefetch)."""
        return self.guessed / self.guessable if self.guessable else None


@dataclass
class PagingStats:
    layers: list[LayerStats] = field(default_factory=list)

    def since(self, before: PagingStats) -> PagingStats:
        """What was counted after `before` (an earlier copy of these stats)."""
        out = PagingStats([LayerStats() for _ in self.layers])
        for o, a, b in zip(out.layers, self.layers, before.layers, strict=True):
            for name in vars(o):
                setattr(o, name, getattr(a, name) - getattr(b, name))
        return out

    def total(self) -> LayerStats:
        out = LayerStats()
        for s in self.layers:
            for name in vars(out):
                setattr(out, name, getattr(out, name) + getattr(s, name))
        return out


class ExpertPager:
    """The slots of every MoE layer, the loader that fills them, and its reader threads."""

    def __init__(self, num_experts: int, num_slots: int, gates: Sequence[nn.Module],
                 top_k: int, loader: ExpertLoader, policy: str = "lru",
                 prefetch: bool = True, read_threads: int = DEFAULT_READ_THREADS) -> None:
        self.num_experts, self.num_slots, self.top_k = num_experts, num_slots, top_k
        self.gates = list(gates)  # each layer's router, for the next layer's guess
        self.loader = loader
        self.slots = [ExpertSlots(num_experts, num_slots, policy) for _ in self.gates]
        self.prefetch = prefetch
        self.stats = PagingStats([LayerStats() for _ in self.gates])
        # each layer's prefetch: expert -> the futures of its read's pieces
        self._pending: list[dict[int, list[Future]] | None] = [None] * len(self.gates)
        # True: read as before the reader pool (the benchmarks' baseline): a guess is read at
        # once and to the end; else after the misses, and withdrawn when wrong (begin)
        self.baseline = False
        self._next: tuple[int, np.ndarray] | None = None  # a guess to read after the misses
        self._prefetched: list[set[int]] = [set() for _ in self.gates]
        self.read_threads = check_read_threads(read_threads)
        self._pool = self._new_pool(read_threads)
        self._guessed: list[set[int] | None] = [None] * len(self.gates)
        self.recorder: PassRecorder | None = None  # sees every layer's routing (routing_trace.py)

    def reset_stats(self) -> None:
        self.wait()
        self.stats = PagingStats([LayerStats() for _ in self.gates])

    def set_policy(self, policy: str, prefetch: bool) -> None:
        """Start over with empty slots under another policy (for measuring policies)."""
        self.wait()
        self.slots = [ExpertSlots(self.num_experts, self.num_slots, policy) for _ in self.gates]
        self._prefetched = [set() for _ in self.gates]
        self._guessed = [None] * len(self.gates)
        self.prefetch = prefetch

    def set_read_threads(self, n: int) -> None:
        """Read with `n` threads from now on (for measuring)."""
        self.wait()
        self.read_threads = check_read_threads(n)
        self._pool.close()
        self._pool = self._new_pool(n)

    def _new_pool(self, n: int) -> MlxPool:
        """Reader threads that end when this pager is closed or collected: a model let go of
        without `close` would otherwise keep threads, and the MLX memory they hold, for good."""
        pool = MlxPool("expert-reads", n)
        # not at exit: threads ending while Python finalizes would abort the process (threads.py)
        weakref.finalize(self, pool.close, False).atexit = False
        return pool

    def wait(self, layer: int | None = None) -> None:
        """Let the prefetch of `layer` (or of every layer) finish."""
        if layer is None:
            self._start_next()
        for i in range(len(self._pending)) if layer is None else (layer,):
            self._settle(i, None)

    def _settle(self, layer: int, needed: set[int] | None) -> None:
        """Finish `layer`'s prefetch. With `needed` (what this pass needs), unless `baseline`, a
        guessed expert that is not needed and whose read has not finished is withdrawn: its
        queued pieces are cancelled and its slot given back (to the expert it evicted when
        none of it was read), so a wrong guess costs neither its remaining bytes nor a wait
        for them before this layer's misses are read. The rest is waited for."""
        pending, self._pending[layer] = self._pending[layer], None
        stats, slots = self.stats.layers[layer], self.slots[layer]
        # the wrong guesses first: waiting for a right one would let a wrong one start
        for expert, futures in sorted((pending or {}).items(),
                                      key=lambda item: needed is None or item[0] in needed):
            if (needed is not None and not self.baseline and expert not in needed
                    and not all(f.done() for f in futures)):
                cancelled = [f.cancel() for f in futures]
                # pieces already running still write into the slot: wait for them first
                stats.bytes_read += sum(f.result() for f, c in zip(futures, cancelled, strict=True)
                                        if not c)
                slots.withdraw(expert, intact=all(cancelled))
                stats.withdrawn += 1
                self._prefetched[layer].discard(expert)
            else:
                stats.reads += 1
                stats.bytes_read += sum(f.result() for f in futures)

    def close(self) -> None:
        self.wait()
        self._pool.close()
        self.loader.close()

    def guess(self, layer: int, x: mx.array) -> mx.array | None:
        """The next layer's likely experts for input `x` of this one (lazy), or None."""
        if not self.prefetch or layer + 1 >= len(self.gates):
            return None
        logits = self.gates[layer + 1](x).reshape(-1, self.num_experts)
        # the likeliest first: it is read first, and a wrong guess read last is withdrawn
        return mx.argsort(-logits, axis=-1)[..., : self.top_k]

    def guess_pays(self, guessed: np.ndarray) -> bool:
        """Whether reading a pass's guess ahead pays: when it fits the slots (one token's) or
        names every expert (a prefill chunk's: whatever is read ahead is needed). In between,
        a verify pass over k drafted tokens needs more experts than the slots hold but not all:
        its guess, most common first, would evict experts the pass needs and read some it does
        not (measured: 1.7x the bytes per token of drafted decoding without it)."""
        distinct = len(np.unique(guessed))
        return distinct <= self.num_slots or distinct >= self.num_experts

    def start_prefetch(self, layer: int, guessed: np.ndarray) -> None:
        """Read the guessed experts of `layer` in the background (at most a slot's worth)."""
        if not self.guess_pays(guessed):
            return
        counts = Counter(guessed.reshape(-1).tolist())
        experts = [e for e, _ in counts.most_common(self.num_slots)]
        self._guessed[layer] = set(experts)
        reads = self.slots[layer].place(experts)
        if not reads:
            return
        self._prefetched[layer].update(e for e, _ in reads)
        self._pending[layer] = {
            e: [self._pool.submit(j, priority=1) for j in jobs]
            for (e, _), jobs in zip(reads, self._pieces(layer, reads), strict=True)}

    def _pieces(self, layer: int, reads: list[tuple[int, int]]
                ) -> list[list[Callable[[], int]]]:
        """The reads of these (expert, slot) pairs, each expert cut for all the threads (one job
        per expert with one thread): the experts are read one after another, each as fast as
        the threads can, so that the last ones are still queued (and can be withdrawn) while
        the first are read."""
        pieces = getattr(self.loader, "pieces", None)
        if pieces is None or self.read_threads == 1:  # an expert whole
            return [[partial(self.loader.load, layer, e, s)] for e, s in reads]
        return [pieces(layer, e, s, self.read_threads) for e, s in reads]

    def _read(self, layer: int, reads: list[tuple[int, int]]) -> int:
        """Read misses now: on this thread with one reader, else together on the pool, ahead
        of the prefetch (which starts after them); the bytes read."""
        if self.read_threads == 1:
            self._start_next()
            return sum(self.loader.load(layer, e, s) for e, s in reads)
        futures = [self._pool.submit(j, priority=0)
                   for jobs in self._pieces(layer, reads) for j in jobs]
        self._start_next()
        return sum(f.result() for f in futures)

    def _start_next(self) -> None:
        if self._next is not None:
            (layer, guess), self._next = self._next, None
            self.start_prefetch(layer, guess)

    def begin(self, layer: int, chosen: np.ndarray, guess: np.ndarray | None
              ) -> list[list[int]]:
        """What a layer does once its router has chosen (`chosen`: expert ids, any shape) and
        its guess of the next layer's experts is known: wait for its own prefetch, start the
        next layer's, and say which experts to `fill` in turn — one group when they fit the
        slots, else groups of `num_slots`, the resident ones first. The live model and a
        replayed trace (routing_trace.py) both decide here."""
        if self.recorder is not None:
            self.recorder.layer(layer, chosen, guess)
        needed = np.unique(chosen).tolist()
        self._settle(layer, set(needed))  # the slots of this layer are complete
        if guess is not None:
            # the next layer's guess is read after this layer's misses (fill), which need the
            # disk first; the baseline reads it at once
            self._next = (layer + 1, guess)
            if self.baseline:
                self._start_next()
        if len(needed) <= self.num_slots:
            return [needed]
        slots = self.slots[layer]
        order = sorted(needed, key=lambda e: not slots.resident(e))
        return [order[i:i + self.num_slots] for i in range(0, len(order), self.num_slots)]

    def fill(self, layer: int, experts: list[int]) -> np.ndarray:
        """Make `experts` (at most one slot each) resident in `layer`; its expert -> slot
        table."""
        slots, stats = self.slots[layer], self.stats.layers[layer]
        prefetched = self._prefetched[layer]
        stats.needed += len(experts)
        hits = [e for e in experts if slots.resident(e)]
        stats.hits += len(hits)
        stats.prefetch_hits += sum(1 for e in hits if e in prefetched)
        if (guessed := self._guessed[layer]) is not None:
            stats.guessable += len(experts)
            stats.guessed += len(guessed.intersection(experts))
        prefetched.difference_update(experts)
        reads = slots.place(experts)
        if reads:
            stats.reads += len(reads)
            stats.bytes_read += self._read(layer, reads)
        self._start_next()
        slots.touch(experts)
        return slots.table


class PagedMoE(nn.Module):
    """A `SparseMoE` whose experts live in `pager`'s slots (same router, same output)."""

    def __init__(self, gate: nn.Linear, switch_mlp: ExpertsGLU, top_k: int, layer: int,
                 pager: ExpertPager) -> None:
        super().__init__()
        self.gate = gate
        self.switch_mlp = switch_mlp  # `num_slots` experts
        self.top_k = top_k
        self.layer = layer
        self.pager = pager
        self.group: mx.distributed.Group | None = None  # tensor parallel: slots hold 1/N

    def __call__(self, x: mx.array, trace: list | None = None) -> mx.array:
        pager, layer = self.pager, self.layer
        gate_logits = self.gate(x)
        indices, weights = route(gate_logits, self.top_k)
        if trace is not None:
            trace.append(RouterRecord(gate_logits.astype(mx.float32), indices, weights))
        guess = pager.guess(layer, x)
        mx.eval(indices if guess is None else [indices, guess])  # this layer's one sync
        chosen = np.array(indices)
        groups = pager.begin(layer, chosen, None if guess is None else np.array(guess))
        dtype = self.switch_mlp.compute_dtype
        xe = x if dtype is None else x.astype(dtype)
        if len(groups) == 1:
            table = pager.fill(layer, groups[0])
            y = self.switch_mlp(xe, mx.array(table[chosen]))
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        else:
            y = self._in_groups(xe, chosen, weights, groups)
        if self.group is not None:  # each rank computed its slice of every expert
            y = mx.distributed.all_sum(y, group=self.group)
        return y.astype(x.dtype)

    def _in_groups(self, x: mx.array, chosen: np.ndarray, weights: mx.array,
                   groups: list[list[int]]) -> mx.array:
        """More experts than slots (prefill): groups of `num_slots` experts, each computed on
        its own (token, expert) pairs and added up."""
        pager = self.pager
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen = chosen.reshape(-1, self.top_k)
        weights = weights.reshape(-1, self.top_k)
        out = None
        for group in groups:
            table = pager.fill(self.layer, group)
            rows, cols = np.nonzero(np.isin(chosen, group))
            at = mx.array(rows)
            y = self.switch_mlp(x[at], mx.array(table[chosen[rows, cols]])[:, None])[:, 0]
            part = y * weights[at, mx.array(cols)][:, None].astype(y.dtype)
            out = (mx.zeros((x.shape[0], y.shape[-1]), y.dtype) if out is None else out)
            out = out.at[at].add(part)
            mx.eval(out)  # done with these slots before the next group overwrites them
        return out.reshape(*shape[:-1], -1)
