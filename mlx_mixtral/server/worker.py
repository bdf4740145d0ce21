"""The one thread that runs the model, the batch it runs, and the queue in front of it.

MLX work for one model runs on one thread. Requests arrive in an inbox and join the batch
(`generation/scheduler.py`: continuous batching) between forward passes; `capacity` sequences
run together, the rest wait, and beyond `max_queue` requests a client hears 503. Each sequence
has a KV cache of its own (so no two sequences ever share one) rebuilt from the prefix store
(`prefixes/store.py`, RAM and disk, kept across restarts) when it joins, whose new blocks the
store copies as the sequence runs; under a lockstep from the `CachePool` instead, given back
when it ends (the ranks' pools see the same caches in the same order, so they agree on hits;
their stores might not). A request whose client went away is cancelled: dropped
if it has not started, out of the batch before the next pass if it has. The HTTP side hears
back through each job's `emit` callback.

With a model split over ranks (`mlx.launch`), rank 0's worker announces before every pass what
changed in the batch (who joins, who was cancelled) to the other ranks' workers (`Lockstep`),
which run the same batch alongside and emit nothing; their caches come and go from their pools
in the same order.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import mlx.core as mx

from ..errors import MlxMixtralError
from ..generation.kv import KVSettings
from ..generation.lockstep import Lockstep
from ..generation.sampling import SamplingParams
from ..generation.scheduler import Request, Scheduler
from ..generation.stats import Stats
from ..model.limits import DECODE_CONCURRENCY
from ..prefixes.store import PrefixStore
from ..threads import release
from .cache_pool import CachePool

log = logging.getLogger("mlx_mixtral.server")

# The prefix store for the loaded model, opened on the worker's thread (its fingerprint reads
# the model's weights).
OpenStore = Callable[[Any], PrefixStore]


class QueueFull(Exception):  # noqa: N818 - the HTTP side answers 503
    pass


LOST = "the model's ranks lost each other; the server is stopping"  # the HTTP side answers 503
STOPPING = "the server is stopping"  # to requests running or waiting when it was told to stop

Job = Request  # what the HTTP side hands over: a prompt, its settings, where the reply goes


class Worker:
    """`load()` runs on the worker's thread too: MLX arrays belong to the thread whose stream
    made them. `ready()` waits for it (and raises what it raised).

    For the HTTP side and /health: `running` (sequences in the batch), `waiting`, `capacity`
    (sequences decoding together), `max_queue`, `served` (requests ended)."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], pool: CachePool | None,
                 max_queue: int, kv: KVSettings | None = None,
                 lockstep: Lockstep | None = None, on_lost: Callable[[], None] | None = None,
                 capacity: int = DECODE_CONCURRENCY, prefill_step: int | None = None,
                 store: OpenStore | None = None) -> None:
        """Prompts are kept in the store `store` opens, else in `pool`, else not at all."""
        self.model: Any = None
        self.tokenizer: Any = None
        self.pool, self.kv, self.max_queue, self.lockstep = pool, kv, max_queue, lockstep
        self.open_store = store
        self.store: PrefixStore | None = None  # opened once the model is loaded
        self.capacity, self.prefill_step = capacity, prefill_step
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.scheduler: Scheduler | None = None  # made once the model is loaded
        # Under a lockstep: what broke it (a rank went away); the worker then stops, and calls
        # `on_lost` from its thread.
        self.lost: BaseException | None = None
        self.on_lost = on_lost
        self.halted = threading.Event()  # told to stop: no new work, running work ends now
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(load,), name="mlx-worker",
                                       daemon=True)
        self.thread.start()

    def ready(self) -> tuple[Any, Any]:
        self._loaded.wait()
        if self._load_error is not None:
            self.thread.join()  # it has released MLX's state: the process may end cleanly
            raise self._load_error
        return self.model, self.tokenizer

    @property
    def running(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.running

    @property
    def waiting(self) -> int:
        return self.inbox.qsize() + (0 if self.scheduler is None else self.scheduler.waiting)

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def served(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.served

    @property
    def forward_calls(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.forward_calls

    def kept(self) -> dict[str, int]:
        """The prompts kept between requests, as /health shows them: bytes in memory (the
        store's memory tier, or the pool's), their budget, and evictions from memory."""
        keeper = self.store.ram if self.store is not None else self.pool
        if keeper is None:
            return {"prompt_cache": 0, "prompt_cache_budget": 0, "prompt_cache_evicted": 0}
        return {"prompt_cache": keeper.nbytes, "prompt_cache_budget": keeper.budget,
                "prompt_cache_evicted": keeper.evicted}

    def submit(self, job: Job) -> None:
        if self.lost is not None or self.halted.is_set():
            job.emit(Stats.failed(LOST if self.lost is not None else STOPPING))
            return
        if self.waiting + self.running >= self.max_queue:
            raise QueueFull
        self.inbox.put(job)

    def halt(self) -> None:
        """The server was told to stop (any thread, a signal handler too): the running and
        waiting jobs end before the next pass, each telling its client why."""
        self.halted.set()
        self.inbox.put(None)  # wakes an idle worker

    def stop(self) -> None:
        """End the thread (after `halt`: at once); the waiting jobs hear that the server
        stops."""
        self.halt()
        self.thread.join()

    def _run(self, load: Callable[[], tuple[Any, Any]]) -> None:
        try:
            self._work(load)
        finally:
            release()  # MLX's state of this thread, before the interpreter ends

    def _work(self, load: Callable[[], tuple[Any, Any]]) -> None:
        try:
            self.model, self.tokenizer = load()
            mx.eval(self.model.parameters())
            self.scheduler = self._scheduler()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by ready()
            self._load_error = e
            return
        finally:
            self._loaded.set()
        try:
            if self.lockstep is not None and not self.lockstep.leader:
                self._follow(self.lockstep)
            else:
                self._lead()
        except Exception as e:  # noqa: BLE001 - only a lockstep lets one through
            self.lost = e
            self.scheduler.cancel_all(LOST)
            self._drain(LOST)
            if self.on_lost is not None:
                self.on_lost()

    def _scheduler(self) -> Scheduler:
        """The batch, its caches taken from and given to the store or the pool."""
        model, kv = self.model, self.kv or KVSettings()
        options: dict[str, Any] = {}
        if self.open_store is not None:
            store = self.store = self.open_store(model)
            options = dict(take=lambda ids: store.take(ids, model.make_cache, bits=kv.bits,
                                                       group_size=kv.group_size),
                           give=store.give, keep_every=store.block)
        elif self.pool is not None:
            options = dict(take=lambda ids: self.pool.take(ids, model.make_cache),
                           give=self.pool.give)
        step = self.prefill_step
        if self.store is not None:
            step = store_chunk(model, self.store.block, step)
            window = getattr(model.args, "sliding_window", None)
            if window is not None and window < self.store.block:
                log.warning("the model's sliding window (%d tokens) is shorter than a prefix "
                            "block (--cache-block %d): no prompt is kept; give --cache-block "
                            "%d or less", window, self.store.block, window)
        return Scheduler(model, self.tokenizer, kv=kv, prefill_step=step,
                         capacity=self.capacity, **options)

    # ---- rank 0 (or the only rank) --------------------------------------------------------------

    def _lead(self) -> None:
        """Until stopped: take new jobs between passes, (announce them), run a pass."""
        scheduler, step = self.scheduler, self.lockstep
        live: dict[int, tuple[Job, Job]] = {}  # under a lockstep: id -> (job, the batch's copy)
        numbers = iter(range(2**62))
        while True:
            new = self._collect(block=not scheduler.busy())
            if self.halted.is_set():
                for job in new:
                    job.emit(Stats.failed(STOPPING))
                new = []
            if step is None:
                for job in new:
                    self._add(job)
                if self.halted.is_set():
                    scheduler.cancel_all(STOPPING)
                    return
            else:
                joined = []
                for job in new:
                    if job.params.seed is None:  # every rank samples alike
                        job.params = replace(job.params, seed=secrets.randbelow(2**31))
                    number = next(numbers)
                    live[number] = job, replace(job, cancelled=threading.Event())
                    joined.append(number)
                if self.halted.is_set():  # every rank drops its batch
                    scheduler.cancel_all(STOPPING)
                    step.announce(None)
                    return
                gone = [k for k, (job, _) in live.items() if job.cancelled.is_set()]
                try:
                    step.announce({"join": [_describe(k, live[k][0]) for k in joined],
                                   "cancel": gone})
                except Exception:
                    for job, _ in live.values():
                        job.emit(Stats.failed(LOST))
                    raise
                for k in joined:
                    self._add(live[k][1])
                for k in gone:
                    live.pop(k)[1].cancelled.set()
            self._step()
            if step is not None:
                live = {k: v for k, v in live.items() if not v[1].ended}
                if not scheduler.busy():
                    step.idle()

    def _collect(self, block: bool) -> list[Job]:
        """The jobs that arrived (waiting for one when `block`), cancelled ones left out."""
        jobs = []
        try:
            item = self.inbox.get() if block else self.inbox.get_nowait()
            while True:
                if item is not None and not item.cancelled.is_set():
                    jobs.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return jobs

    def _drain(self, why: str) -> None:
        for job in self._collect(block=False):
            job.emit(Stats.failed(why))

    def _add(self, job: Job) -> None:
        try:
            self.scheduler.add(job)
        except MlxMixtralError as e:
            job.emit(Stats.failed(str(e)))

    def _step(self) -> None:
        """One pass of the batch; a failure ends the sequences it held (under a lockstep the
        ranks may no longer be in step: the failure goes on)."""
        try:
            self.scheduler.step()
        except Exception as e:  # the server lives on; the clients hear why
            if self.lockstep is not None:
                raise
            if not isinstance(e, MlxMixtralError):
                log.exception("generation failed")
                e = f"generation failed: {type(e).__name__}: {e}"
            self.scheduler.cancel_all(str(e))

    # ---- the other ranks ----------------------------------------------------------------------

    def _follow(self, step: Lockstep) -> None:
        """Run rank 0's batch: its joins and cancellations, then the same pass."""
        live: dict[int, Job] = {}
        while (message := step.announce(None)) is not None:
            for described in message["join"]:
                live[described["id"]] = job = _job_from(described)
                self._add(job)
            for k in message["cancel"]:
                live.pop(k).cancelled.set()
            self._step()
            live = {k: j for k, j in live.items() if not j.ended}
        self.scheduler.cancel_all()


def store_chunk(model: Any, block: int, wanted: int | None) -> int | None:
    """The prefill chunk with a prefix store: a sliding-window cache holds only its last
    window, so a chunk may be at most window - block + 1 tokens for every block to be whole
    and still held when the chunk ends (when it is given to the store)."""
    from ..generation.stream import prefill_chunk

    window = getattr(model.args, "sliding_window", None)
    if window is None or window < block:  # (then no block is ever held whole: none is kept)
        return wanted
    return min(prefill_chunk(model, wanted), window - block + 1)


def _describe(number: int, job: Job) -> dict[str, Any]:
    return {"id": number, "ids": job.ids, "params": job.params.to_dict(), "stop": job.stop,
            "logprobs": job.logprobs, "grammar": job.grammar, "n": job.n}


def _job_from(message: dict[str, Any]) -> Job:
    """A job announced by rank 0, run here for the collectives only: it emits nothing."""
    return Job(message["ids"], SamplingParams(**message["params"]), lambda _: None,
               stop=message["stop"], logprobs=message["logprobs"], grammar=message["grammar"],
               n=message["n"])
