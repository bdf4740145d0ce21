"""What the server measures: Prometheus metrics for `/metrics`, and each reply's `timings`.

The metrics live in a registry of the app's own (not prometheus_client's global one), so two
apps in one process (the tests) never share counts. Every job's events pass through `watch`
on the worker's thread: token counts and latencies are taken where the tokens are made, also
for replies whose client has left. Gauges (running, waiting) and the expert pager's counts are
read when `/metrics` is scraped.

`timings` is llama.cpp's object (its server's `timings`), computed once here for OpenAI's
responses and Ollama's duration fields alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..generation.stats import Chunk, Stats

PREFIX = "mlx_mixtral"
# Seconds: a token on a big model on a small Mac takes long, the queue longer still.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Paths named in `requests_total`; any other (a fuzzer's, a typo) counts as "other", so that a
# client cannot grow the label set without end.
OTHER_PATH = "other"


def occupancy(worker: Any) -> tuple[int, int, int]:
    """(running, waiting, capacity) of the worker. A worker that batches has `running` and
    `capacity`; the one-at-a-time worker has `busy` and runs one."""
    running = getattr(worker, "running", None)
    if running is None:
        running = int(worker.busy)
    return int(running), int(worker.waiting), int(getattr(worker, "capacity", 1))


def decode_seconds(stats: Stats) -> float:
    """The time spent generating after the first token (`Stats` keeps it as a rate)."""
    n = stats.generation_tokens
    return (n - 1) / stats.generation_tps if n > 1 and stats.generation_tps > 0 else 0.0


def timings(stats: Stats) -> dict[str, float | int]:
    """llama.cpp's `timings`: the prompt tokens processed (the cached ones not counted) and the
    time to the first token; the tokens generated and the time after the first."""
    prompt_ms, predicted_ms = stats.ttft * 1e3, decode_seconds(stats) * 1e3

    def per_token(ms: float, n: int) -> float:
        return ms / n if n else 0.0

    def per_second(ms: float, n: int) -> float:
        return n * 1e3 / ms if ms > 0 else 0.0

    return {"cache_n": stats.cached_tokens,
            "prompt_n": stats.prompt_tokens, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per_token(prompt_ms, stats.prompt_tokens),
            "prompt_per_second": per_second(prompt_ms, stats.prompt_tokens),
            "predicted_n": stats.generation_tokens, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per_token(predicted_ms, stats.generation_tokens),
            "predicted_per_second": per_second(predicted_ms, stats.generation_tokens)}


# Counts that another part keeps itself, read at each scrape: (name, help, value) each.
Counts = Callable[[], Sequence[tuple[str, str, float]]]


class _Counted(Collector):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, doc, value in self.counts():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class _Gauged(Collector):
    def __init__(self, levels: Counts) -> None:
        self.levels = levels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, doc, value in self.levels():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def pager_counts(pager: Any) -> Counts:
    def counts() -> Sequence[tuple[str, str, float]]:
        total = pager.stats.total()
        return (("expert_cache_needed", "experts the router chose, per layer and pass",
                 total.needed),
                ("expert_cache_hits", "of those, already in memory", total.hits),
                ("expert_reads", "experts read from disk (misses and prefetches)", total.reads),
                ("expert_read_bytes", "bytes of experts read from disk", total.bytes_read))

    return counts


def pool_counts(pool: Any) -> Counts:
    return lambda: (("prompt_cache_evictions", "kept caches dropped to stay within the "
                     "prompt-cache budget", pool.evicted),)


# The prefix store's stats() keys, as counters (name, help) and gauges.
STORE_COUNTERS = {
    "hits": "prompts that found stored blocks",
    "misses": "prompts that found none",
    "tokens_reused": "prompt tokens rebuilt from stored blocks",
    "ram_block_hits": "blocks found in memory",
    "disk_block_hits": "blocks read back from disk",
    "blocks_added": "new blocks stored",
    "ram_evictions": "blocks dropped from memory to stay within --cache-ram (still on disk)",
    "disk_evictions": "block files deleted to stay within --cache-disk",
    "disk_dropped": "damaged block files found and deleted",
}
STORE_GAUGES = {
    "ram_bytes": "bytes of blocks in memory",
    "ram_budget": "bytes of blocks memory may hold (--cache-ram)",
    "ram_blocks": "blocks in memory",
    "disk_bytes": "bytes of block files on disk",
    "disk_budget": "bytes of block files the disk may hold (--cache-disk)",
}


def store_counts(store: Any, kinds: dict[str, str]) -> Counts:
    """The store's stats named in `kinds`, read at each scrape."""
    def counts() -> Sequence[tuple[str, str, float]]:
        stats = store.stats()  # (once: it looks at the disk tier's files)
        return [(f"prefix_store_{key}", doc, stats[key]) for key, doc in kinds.items()]

    return counts


def prompt_cache_evictions(store: Any) -> Counts:
    """The prompt-cache evictions of before the store: now its memory tier's."""
    return lambda: (("prompt_cache_evictions", "blocks dropped from memory to stay within "
                     "--cache-ram", store.ram.evicted),)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.paths: set[str] = set()  # the app's routes (create_app sets them)
        r, p = self.registry, PREFIX
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens",
                                     "prompt tokens processed (cached ones not counted)",
                                     registry=r)
        self.prompt_seconds = Counter(f"{p}_prompt_seconds",
                                      "seconds spent on prompts, to each first token", registry=r)
        self.cache_tokens = Counter(f"{p}_prompt_cache_hit_tokens",
                                    "prompt tokens taken from kept KV caches", registry=r)
        self.generated_tokens = Counter(f"{p}_generated_tokens", "tokens generated",
                                        registry=r)
        self.generated_seconds = Counter(f"{p}_generated_seconds",
                                         "seconds spent generating after each first token",
                                         registry=r)
        self.replies = Counter(f"{p}_replies", "replies by how they ended", ["finish_reason"],
                               registry=r)
        self.running = Gauge(f"{p}_requests_running", "requests generating now", registry=r)
        self.waiting = Gauge(f"{p}_requests_waiting", "requests queued", registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds",
                              "from the request's arrival in the queue to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds",
                             "between one token of a reply and the next",
                             buckets=ITL_BUCKETS, registry=r)

    def watch_counts(self, counts: Counts) -> None:
        """Expose counts kept elsewhere (the expert pager's, the prompt-cache pool's)."""
        self.registry.register(_Counted(counts))

    def watch_levels(self, levels: Counts) -> None:
        """Expose levels kept elsewhere (the prefix store's bytes), as gauges."""
        self.registry.register(_Gauged(levels))

    def watch_store(self, store: Any) -> None:
        """The prefix store's counters and gauges."""
        self.watch_counts(store_counts(store, STORE_COUNTERS))
        self.watch_counts(prompt_cache_evictions(store))
        self.watch_levels(store_counts(store, STORE_GAUGES))

    def watch(self, emit: Callable[[Chunk | Stats], None]) -> Callable[[Chunk | Stats], None]:
        """`emit` with the job's tokens and times counted on the way (the worker's thread)."""
        queued = time.perf_counter()
        last: float | None = None
        counted = 0

        def seen(event: Chunk | Stats) -> None:
            nonlocal last, counted
            if isinstance(event, Stats):
                if event.error is None:
                    self._ended(event, counted)
            elif event.token is not None:
                now = time.perf_counter()
                if last is None:
                    self.ttft.observe(now - queued)
                else:
                    self.itl.observe(now - last)
                last, counted = now, counted + 1
                self.generated_tokens.inc()
            emit(event)

        return seen

    def _ended(self, stats: Stats, counted: int) -> None:
        # The EOS that ended a reply is a token of its usage but never a chunk.
        self.generated_tokens.inc(max(stats.generation_tokens - counted, 0))
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cache_tokens.inc(stats.cached_tokens)
        self.prompt_seconds.inc(stats.ttft)
        self.generated_seconds.inc(decode_seconds(stats))
        self.replies.labels(stats.finish_reason or "unknown").inc()

    def answered(self, path: str, status: int) -> None:
        self.requests.labels(path if path in self.paths else OTHER_PATH, str(status)).inc()

    def exposition(self, worker: Any) -> bytes:
        """The Prometheus text format, the gauges read now."""
        running, waiting, _ = occupancy(worker)
        self.running.set(running)
        self.waiting.set(waiting)
        return generate_latest(self.registry)
