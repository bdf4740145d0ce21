"""The narrow interface between the chat app and the model.

The app calls an `Engine` only from its one MLX worker thread, and hears back through the
`emit` callback. `MlxEngine` runs a real model through `ChatSession`; tests may pass any object
with the same methods (a fake backend, or a tiny real model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxMixtralError
from ..generation.kv import KVSettings
from ..generation.sampling import SamplingParams
from ..generation.session import ChatSession
from ..generation.speculative import Drafter
from ..generation.stats import PrefillStopped, Stats
from ..generation.stream import context_length, prefill_chunk, settle
from ..model.decoder import Model
from ..model.routing import RouterTrace
from ..text.tokenizer import Tokenizer
from ..units import gb, human
from .prompt_caches import PromptCaches

# Prompt tokens per prefill chunk: small enough that progress moves every few seconds on a
# slow machine, large enough that Metal stays busy.
PREFILL_STEP = 256


@dataclass
class EngineInfo:
    name: str
    parameters: int = 0
    active_parameters: int = 0
    quantization: str = "float"
    memory_bytes: int = 0
    streaming: str | None = None  # "4/8 experts per layer in memory" within --max-memory
    is_moe: bool = False
    layers: int = 0
    experts: int = 0
    top_k: int = 0
    context: int = 0
    window: int | None = None
    chat_format: str = ""
    server: str | None = None  # chat --server: the model runs there

    def describe(self) -> str:
        if self.server:
            return f"{self.name} at {self.server}"
        moe = (f", {self.experts} experts (top-{self.top_k}), "
               f"{human(self.active_parameters, 'B')} active" if self.is_moe else "")
        return (f"{self.name}: {human(self.parameters, 'B')} parameters{moe}, "
                f"{self.quantization}, {gb(self.memory_bytes)} in memory"
                + (f" ({self.streaming})" if self.streaming else ""))


@dataclass
class ReplyEvent:
    """From the worker: a piece of text, or the end of a reply (with its numbers)."""

    text: str = ""
    done: bool = False
    finish_reason: str | None = None  # "stop", "length" or "stopped" (by the user)
    stats: Stats | None = None
    context_used: int = 0
    expert_share: list[list[float]] | None = None  # layers x experts, share of reply tokens
    balance: float | None = None  # load-balancing loss over the reply (1.0 = even)
    error: str | None = None
    prefill: tuple[int, int] | None = None  # (done, total) tokens of the prompt read so far


class Engine(Protocol):
    info: EngineInfo

    def load(self, progress: Callable[[float], None]) -> EngineInfo: ...

    def set_conversation(self, system: str | None, messages: list[dict[str, str]],
                         key: str | None = None) -> None: ...

    def set_conversation_key(self, key: str | None) -> None: ...

    def prefill(self, progress: Callable[[int, int], None],
                should_stop: Callable[[], bool]) -> int: ...  # tokens then in the cache

    def select(self, name: str) -> None: ...

    def reply(self, action: str, text: str | None, settings: SamplingParams,
              emit: Callable[[ReplyEvent], None], should_stop: Callable[[], bool]) -> None: ...


class TracedModel:
    """Our model with a `RouterTrace` attached to every call, for the experts panel."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.trace = model, RouterTrace()
        self.args, self.layers = model.args, model.layers
        self.max_context = getattr(model, "max_context", None)

    def make_cache(self, slack: int = 0) -> list:
        return self.model.make_cache(slack)

    def prefill_chunk(self, wanted: int) -> int:
        return prefill_chunk(self.model, wanted)

    def __call__(self, inputs: mx.array, cache: list | None = None, **kwargs: Any) -> mx.array:
        return self.model(inputs, cache=cache, router_trace=self.trace, **kwargs)


def quantization_of(model: nn.Module) -> str:
    bits = sorted({m.bits for _, m in model.named_modules() if hasattr(m, "bits")})
    return "float" if not bits else "/".join(str(b) for b in bits) + "-bit"


def streaming_label(model: Model) -> str | None:
    plan = model.memory_plan
    if plan is None or not plan.streaming:
        return None
    return f"{plan.slots}/{plan.experts} experts per layer in memory"


class MlxEngine:
    def __init__(self, model_name: str, force: bool = False, dtype: str | None = None,
                 kv: KVSettings | None = None, caches: PromptCaches | None = None,
                 drafting: Callable[[Model, Tokenizer], Drafter] | None = None,
                 max_memory: int | None = None) -> None:
        self.model_name = model_name
        self.max_memory = max_memory  # bytes: experts stream when the model is larger
        self.force = force  # load even if the model looks too big for free memory
        self.dtype, self.kv, self.caches, self.drafting = dtype, kv, caches, drafting
        self.key: str | None = None  # the conversation whose cache is saved
        self.info = EngineInfo(name=Path(model_name).name or model_name)
        self.session: ChatSession | None = None
        self.traced: TracedModel | None = None
        self.model: nn.Module | None = None

    def select(self, name: str) -> None:
        """Drop the loaded model (its memory is free before the next `load`), and name the next
        one."""
        self.session = self.traced = self.model = None
        self.key = None
        mx.clear_cache()
        self.model_name = name
        self.info = EngineInfo(name=Path(name).name or name)

    def load(self, progress: Callable[[float], None]) -> EngineInfo:
        from ..loading import load

        budget = self.max_memory
        if budget is None:  # a model picked in the app that is too big streams its experts
            from ..loading import describe, resolve
            from ..loading.memory_plan import automatic_plan

            plan = automatic_plan(describe(resolve(self.model_name)), self.force, self.dtype)
            budget = plan and plan.budget
        model, tokenizer = load(self.model_name, force=self.force, dtype=self.dtype,
                                max_memory=budget)
        if Path(self.model_name).expanduser().exists():
            from ..loading.catalog import remember

            remember(self.model_name)  # the model picker offers it again
        layers = model.layers
        for i, layer in enumerate(layers):  # read the weights now, with visible progress
            mx.eval(layer.parameters())
            progress((i + 1) / (len(layers) + 1))
        mx.eval(model.parameters())
        progress(1.0)
        args = model.args
        total, active = args.parameter_counts()
        self.traced = TracedModel(model) if args.is_moe else None
        draft = self.drafting(model, tokenizer) if self.drafting else None
        self.session = ChatSession(self.traced or model, tokenizer, kv=self.kv, draft=draft)
        self.session.prefill_step = PREFILL_STEP
        self.model = model
        self.info = EngineInfo(
            name=self.info.name, parameters=total, active_parameters=active,
            quantization=quantization_of(model), memory_bytes=mx.get_active_memory(),
            is_moe=args.is_moe, layers=args.num_hidden_layers,
            experts=args.num_local_experts if args.is_moe else 0,
            top_k=args.num_experts_per_tok if args.is_moe else 0,
            context=context_length(model), window=args.sliding_window,
            chat_format=self.session.chat_format, streaming=streaming_label(model))
        return self.info

    def set_conversation(self, system: str | None, messages: list[dict[str, str]],
                         key: str | None = None) -> None:
        self.session.load_messages(messages, system)
        self.key = key
        if key is not None and self.caches is not None and self.caches.path(key).is_file():
            self._restore(key)

    def set_conversation_key(self, key: str | None) -> None:
        self.key = key

    def prefill(self, progress: Callable[[int, int], None],
                should_stop: Callable[[], bool]) -> int:
        """Read the opened conversation into the cache now, so its next reply starts at once;
        return how many tokens the cache then holds."""
        if self.session.prefill(progress, should_stop):
            self._save()
        return len(self.session.cached)

    def _restore(self, key: str) -> None:
        from ..loading.prompt_cache import load_prompt_cache

        try:
            cache, meta = load_prompt_cache(self.caches.path(key), return_metadata=True,
                                            model=self.model)
            self.session.adopt_cache(cache, meta["tokens"], json.loads(meta.get("replies",
                                                                                  "[]")))
        except (MlxMixtralError, ValueError, TypeError) as e:
            self.caches.discard(key, str(e))
            return
        self.caches.used(key)

    def _save(self) -> None:
        from ..loading.prompt_cache import save_prompt_cache

        if self.key is None or self.caches is None or not self.session.cached:
            return
        session = self.session
        save_prompt_cache(self.caches.path(self.key), session.cache,
                          {"replies": json.dumps(session.replies_state())}, model=self.model,
                          tokens=session.cached)
        self.caches.evict()

    def reply(self, action: str, text: str | None, settings: SamplingParams,
              emit: Callable[[ReplyEvent], None], should_stop: Callable[[], bool]) -> None:
        session = self.session
        if self.traced is not None:
            self.traced.trace = RouterTrace()
        def prefilled(done: int, total: int) -> None:
            emit(ReplyEvent(prefill=(done, total)))
            if should_stop():
                raise PrefillStopped  # Esc during a long prompt: stop between chunks

        kw = dict(sampling=settings, progress=prefilled)
        start = {"send": lambda: session.send(text, **kw),
                 "regenerate": lambda: session.regenerate(**kw),
                 "edit": lambda: session.edit_last(text, **kw)}[action]
        finish, stats = None, None
        stream = start()
        try:
            for item in stream:
                if isinstance(item, Stats):
                    stats = item
                    continue
                if item.text:
                    emit(ReplyEvent(text=item.text))
                if item.finish_reason:
                    finish = item.finish_reason
                if should_stop():
                    finish = "stopped"
                    break
        finally:
            stream.close()
            # mlx-lm queues the next token's work before yielding this one: let it finish
            # here, or a process that ends now may find MLX's own thread still busy (abort).
            settle()
        share, balance = self._experts()
        emit(ReplyEvent(done=True, finish_reason=finish, stats=stats or session.last_stats,
                        context_used=len(session.cached), expert_share=share, balance=balance))
        self._save()  # after the reply is shown; the worker does it before the next job

    def _experts(self) -> tuple[list[list[float]] | None, float | None]:
        """Which experts each layer chose for the reply's tokens (decode steps only)."""
        if self.traced is None:
            return None, None
        steps = RouterTrace(r for r in self.traced.trace if r.indices.shape[-2] == 1)
        if not steps:
            return None, None
        layers = self.info.layers
        per_layer = [RouterTrace(steps[i::layers]) for i in range(layers)]
        experts, top_k = self.info.experts, self.info.top_k
        counts = mx.stack([t.expert_counts(experts).sum(axis=0) for t in per_layer])
        # Share of the reply's tokens that chose each expert (a row sums to top_k).
        share = counts * top_k / mx.maximum(counts.sum(axis=1, keepdims=True), 1)
        balance = steps.load_balancing_loss(experts, top_k).item()
        return share.tolist(), balance

