"""The chat app's engine on this machine: a model loaded with MLX, run through `ChatSession`,
its KV cache kept between turns (and in the prefix store between chats and runs, with
`ChatPrefixes`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from ..catalog.summary import quantization_of
from ..generation.kv import KVSettings
from ..generation.sampling import SamplingParams, model_defaults
from ..generation.session import ChatSession
from ..generation.speculative import Drafter
from ..generation.stats import PrefillStopped, Stats
from ..generation.stream import context_length, settle
from ..model.decoder import Model
from ..model.routing import RouterTrace
from ..text.tokenizer import Tokenizer
from .chat_prefixes import ChatPrefixes
from .engine import Emit, EngineInfo, ModelList, Prefill, Prompt, ShouldStop

if TYPE_CHECKING:
    from ..loading.load_plan import LoadPlan
    from ..loading.memory_plan import DraftNeeds

# Prompt tokens per prefill chunk: small enough that progress moves every few seconds on a
# slow machine, large enough that Metal stays busy.
PREFILL_STEP = 256


def paging_label(model: Model) -> str | None:
    plan = model.limits.memory_plan
    if plan is None or not plan.paging:
        return None
    return f"{plan.slots}/{plan.experts} experts per layer in memory"


def model_info(name: str, model: Model, chat_format: str) -> EngineInfo:
    args = model.args
    total, active = args.parameter_counts()
    return EngineInfo(
        name=name, parameters=total, active_parameters=active,
        quantization=quantization_of(model), memory_bytes=mx.get_active_memory(),
        is_moe=args.is_moe, layers=args.num_hidden_layers,
        experts=args.num_local_experts if args.is_moe else 0,
        top_k=args.num_experts_per_tok if args.is_moe else 0,
        context=context_length(model), window=args.sliding_window,
        chat_format=chat_format, paging=paging_label(model), defaults=model_defaults(model))


class MlxEngine:
    def __init__(self, model_name: str, force: bool = False, dtype: str | None = None,
                 kv: KVSettings | None = None, prefixes: ChatPrefixes | None = None,
                 drafting: Callable[[Model, Tokenizer], Drafter] | None = None,
                 max_memory: int | str | None = None, plan: LoadPlan | None = None,
                 draft: DraftNeeds | None = None, read_threads: int | None = None) -> None:
        self.model_name = model_name
        self.max_memory = max_memory  # experts are paged when the model is larger
        self.read_threads = read_threads  # --read-threads, for every model picked
        self.plan = plan  # the first model's plan, made by the command line (read once)
        self.draft = draft  # drafting's share of the budget, in every model's plan
        self.force = force  # load even if the model looks too big for free memory
        self.dtype, self.kv, self.prefixes, self.drafting = dtype, kv, prefixes, drafting
        self.key: str | None = None  # the chat the session holds (its blocks are kept so)
        self.info = EngineInfo(name=Path(model_name).name or model_name)
        self.session: ChatSession | None = None
        self.trace: RouterTrace | None = None  # the last reply's routing (Mixtral)
        self.model: nn.Module | None = None

    def select(self, name: str) -> None:
        """Drop the loaded model (its memory is free before the next `load`), and name the next
        one."""
        from ..model.limits import close_model

        if self.model is not None:
            close_model(self.model)
        self.session = self.trace = self.model = self.plan = None
        self.key = None
        mx.clear_cache()
        self.model_name = name
        self.info = EngineInfo(name=Path(name).name or name)

    def models(self) -> ModelList:
        from ..catalog.local import local_models
        from ..loading.memory import available_memory

        return ModelList(local_models(), available_memory())

    def load(self, progress: Callable[[float], None]) -> EngineInfo:
        from ..loading import load_planned, plan_load

        plan = self.plan or plan_load(self.model_name, force=self.force, dtype=self.dtype,
                                      max_memory=self.max_memory, draft=self.draft,
                                      read_threads=self.read_threads)
        self.plan = None  # a model picked later plans afresh
        model, tokenizer = load_planned(plan)
        if Path(self.model_name).expanduser().exists():
            from ..catalog.local import remember

            remember(self.model_name)  # the model picker offers it again
        for i, layer in enumerate(model.layers):  # read the weights now, with visible progress
            mx.eval(layer.parameters())
            progress((i + 1) / (len(model.layers) + 1))
        mx.eval(model.parameters())
        progress(1.0)
        draft = self.drafting(model, tokenizer) if self.drafting else None
        self.session = ChatSession(model, tokenizer, kv=self.kv, draft=draft)
        self.session.prefill_step = PREFILL_STEP
        if self.prefixes is not None:
            self.prefixes.open(model, self.info.name)
            self.session.on_chunk = self.prefixes.give
        self.model, self.key = model, None
        self.info = replace(model_info(self.info.name, model, self.session.chat_format),
                            source=self.model_name)
        return self.info

    def _open(self, prompt: Prompt) -> None:
        """Bring the session to `prompt`. Another chat starts from the blocks the prefix store
        holds of it; the same chat keeps the cache it has, and the next turn reads only what
        changed."""
        if prompt.key == self.key:
            self.session.sync(prompt.messages, prompt.system)
            return
        self.session.load_messages(prompt.messages, prompt.system)
        self.key = prompt.key
        if prompt.key is not None and self.prefixes is not None:
            self.prefixes.restore(self.session, prompt.key)

    def forget(self, key: str) -> None:
        """A chat was deleted: free its blocks no other chat uses, and let no later chat (the
        database may give it the same id) take its cache in memory for its own."""
        if self.key == key:
            self.key = None
        if self.prefixes is not None and self.prefixes.store is not None:
            self.prefixes.free_deleted()

    def prefill(self, prompt: Prompt, emit: Emit, should_stop: ShouldStop) -> int:
        """Read the opened conversation into the cache now, so its next reply starts at once;
        return how many tokens the cache then holds."""
        self._open(prompt)
        if self.session.prefill(lambda done, total: emit(Prefill(done, total)), should_stop):
            self._save()
        return len(self.session.cached)

    def _save(self) -> None:
        """Keep the session's new blocks, and what the chat needs to find them again."""
        if self.key is None or self.prefixes is None or not self.session.cached:
            return
        self.prefixes.keep(self.session, self.key)

    def reply(self, prompt: Prompt, settings: SamplingParams, emit: Emit,
              should_stop: ShouldStop) -> None:
        """Answer `prompt`'s last message; the cache already holds most of what precedes it."""
        self._open(prompt)
        session = self.session
        self.trace = RouterTrace() if self.info.is_moe else None

        def prefilled(done: int, total: int) -> None:
            emit(Prefill(done, total))
            if should_stop():
                raise PrefillStopped  # Esc during a long prompt: stop between chunks

        end = None
        stream = session.reply(sampling=settings, progress=prefilled, router_trace=self.trace)
        try:
            for item in stream:
                if isinstance(item, Stats):
                    end = item
                elif item.text:
                    emit(item)
                if should_stop():
                    break
        finally:
            stream.close()
            # mlx-lm queues the next token's work before yielding this one: let it finish
            # here, or a process that ends now may find MLX's own thread still busy (abort).
            settle()
        # Stopped (here, or while reading the prompt): the session booked the numbers so far.
        share, balance = self._experts()
        emit(replace(end or session.last_stats, context_used=len(session.cached),
                     expert_share=share, balance=balance))
        self._save()  # after the reply is shown; the worker does it before the next job

    def _experts(self) -> tuple[list[list[float]] | None, float | None]:
        """Which experts each layer chose for the reply's tokens (decode steps only)."""
        if self.trace is None:
            return None, None
        steps = RouterTrace(r for r in self.trace if r.indices.shape[-2] == 1)
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
