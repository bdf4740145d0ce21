"""The one thread that runs the model, and the queue in front of it.

MLX work for one model runs on one thread: requests wait in a bounded queue and are generated
one after another, each with a KV cache of its own taken from the `CachePool` (so no two
requests ever share a cache). A request whose client went away is cancelled: it is dropped if it
has not started, and stops at its next token if it has. The HTTP side hears back through each
job's `emit` callback.

(On Metal, batching several requests per forward pass would raise throughput; on this CPU
backend a batch costs as much as its requests one by one, so the queue runs them in turn.)

With a model split over ranks (`mlx.launch`), rank 0's worker announces each job to the other
ranks' workers (`Lockstep`), which run it alongside and emit nothing; a cancellation reaches
them within a few tokens, and their caches come and go from their pools in the same order.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from ..errors import MlxMixtralError
from ..generation.kv import KVSettings
from ..generation.lockstep import Lockstep
from ..generation.sampling import SamplingParams
from ..generation.stats import Chunk, Stats
from ..generation.stream import settle, stream_generate
from ..threads import release
from .cache_pool import CachePool

log = logging.getLogger("mlx_mixtral.server")


class QueueFull(Exception):  # noqa: N818 - the HTTP side answers 503
    pass


LOST = "the model's ranks lost each other; the server is stopping"  # the HTTP side answers 503
STOPPING = "the server is stopping"  # to requests running or waiting when it was told to stop


@dataclass
class Job:
    ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk | Stats], None]  # chunks, then the end
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    grammar: str | None = None  # an llguidance grammar the output must follow
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """`load()` runs on the worker's thread too: MLX arrays belong to the thread whose stream
    made them. `ready()` waits for it (and raises what it raised)."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], pool: CachePool, max_queue: int,
                 kv: KVSettings | None = None, lockstep: Lockstep | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.pool, self.kv, self.max_queue, self.lockstep = pool, kv, max_queue, lockstep
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.served = 0
        # Under a lockstep: what broke it (a rank went away); the worker then stops, and calls
        # `on_lost` from its thread.
        self.lost: BaseException | None = None
        self.on_lost = on_lost
        self.halted = threading.Event()  # told to stop: no new work, running work ends now
        self._running: Job | None = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
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
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        if self.lost is not None or self.halted.is_set():
            job.emit(Stats.failed(LOST if self.lost is not None else STOPPING))
            return
        if self.waiting + self.busy >= self.max_queue:
            raise QueueFull
        self.jobs.put(job)

    def halt(self) -> None:
        """The server was told to stop (any thread, a signal handler too): the running job ends
        at its next token and the waiting ones at once, each telling its client why."""
        self.halted.set()
        if (job := self._running) is not None:
            job.cancelled.set()

    def stop(self) -> None:
        """End the thread once its job is done (after `halt`: at once); the waiting jobs hear
        that the server stops."""
        self.halt()
        self.jobs.put(None)
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
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by ready()
            self._load_error = e
            return
        finally:
            self._loaded.set()
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 - only a lockstep lets one through
            self.lost = e
            while not self.jobs.empty():  # nobody will run them
                if (job := self.jobs.get()) is not None:
                    job.emit(Stats.failed(LOST))
            if self.on_lost is not None:
                self.on_lost()

    def _serve(self) -> None:
        while (job := self._next_job()) is not None:
            self.busy, self._running = True, job
            if self.halted.is_set():
                job.cancelled.set()
            try:
                self._generate(job)
            except MlxMixtralError as e:
                job.emit(Stats.failed(str(e)))
            except Exception as e:  # noqa: BLE001 - the server lives on; the client hears why
                if self.lockstep is not None:  # the ranks may no longer be in step
                    job.emit(Stats.failed(LOST))
                    raise
                log.exception("generation failed")
                job.emit(Stats.failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy, self._running = False, None
                self.served += 1
                if self.lockstep is not None:
                    self.lockstep.idle()

    def _next_job(self) -> Job | None:
        """The next job to run (None: stop). Under a lockstep, rank 0 announces it and the
        other ranks receive it."""
        step = self.lockstep
        if step is not None and not step.leader:
            message = step.announce(None)
            return None if message is None else _job_from(message)
        while (job := self.jobs.get()) is not None and (job.cancelled.is_set()
                                                         or self.halted.is_set()):
            if self.halted.is_set():
                job.emit(Stats.failed(STOPPING))  # else its client went away while it waited
        if step is not None:
            if job is not None and job.params.seed is None:  # every rank samples alike
                job.params = replace(job.params, seed=secrets.randbelow(2**31))
            try:
                step.announce(None if job is None else _describe(job))
            except Exception:
                if job is not None:
                    job.emit(Stats.failed(LOST))
                raise
        return job

    def _generate(self, job: Job) -> None:
        from ..generation.grammar import GrammarMask

        cache, common = self.pool.take(job.ids, self.model.make_cache)
        new = job.ids[common:]
        processors = [GrammarMask(self.tokenizer, self.model.args.vocab_size, job.grammar,
                                  len(new))] if job.grammar else []
        tokens: list[int] = []
        complete = stopped = False
        step = self.lockstep
        steps = stream_generate(self.model, self.tokenizer, new, sampling=job.params,
                                stop=job.stop, cache=cache, history=job.ids[:common],
                                kv=self.kv,
                                processors=processors, logprobs=job.logprobs,
                                progress=None if step is None else lambda *_: step.busy())
        try:
            for item in steps:
                if isinstance(item, Stats):
                    tokens = item.tokens  # with the EOS that ended it
                    job.emit(replace(item, cached_tokens=common))
                    complete = True
                    break
                if item.token is not None:
                    tokens.append(item.token)
                job.emit(item)
                stopped = job.cancelled.is_set()
                if step is not None:
                    stopped = step.should_stop(stopped)
                if stopped:
                    if self.halted.is_set():
                        job.emit(Stats.failed(STOPPING))
                    break
        finally:
            steps.close()
            settle()  # mlx-lm's next step may still be queued: the cache settles first
            # A cache is kept only in a known state: whole, or stopped between tokens.
            if complete or stopped:
                self._keep(job.ids + tokens, cache)

    def _keep(self, held: list[int], cache: list) -> None:
        """Give the cache back to the pool, holding a prefix of `held`. (mlx-lm may have run
        one token further than was read from it: that one is trimmed off.)"""
        extra = cache[0].offset - len(held)
        if extra > 0:
            if not all(c.is_trimmable() for c in cache):
                return
            for c in cache:
                c.trim(extra)
            if not all(getattr(c, "complete", True) for c in cache):
                return
        self.pool.give(held[:cache[0].offset], cache)


def _describe(job: Job) -> dict[str, Any]:
    return {"ids": job.ids, "params": job.params.to_dict(), "stop": job.stop,
            "logprobs": job.logprobs, "grammar": job.grammar}


def _job_from(message: dict[str, Any]) -> Job:
    """A job announced by rank 0, run here for the collectives only: it emits nothing."""
    return Job(message["ids"], SamplingParams(**message["params"]), lambda _: None,
               stop=message["stop"], logprobs=message["logprobs"], grammar=message["grammar"])
