"""The narrow interface between the chat app and a model, and what passes through it.

An engine answers a whole conversation (a `Prompt`) each time: the app's `Conversation` keeps
the messages and decides what send, regenerate and edit mean, so an engine only reads prompts
and writes replies. The app calls an engine from its one worker thread (but `models`), and hears
back through `emit`: `Prefill` progress, the reply's `Chunk`s, then its end (`Stats`).

This module imports no MLX: `chat --server` (`HttpEngine`) loads nothing and should not pay for
it. `MlxEngine` (mlx_engine.py) runs a model here; tests may pass any object with the same
methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..catalog.local import LocalModel
from ..generation.sampling import ModelDefaults, SamplingParams
from ..generation.stats import Chunk, Stats
from ..units import gb, human


@dataclass
class EngineInfo:
    name: str
    parameters: int = 0
    active_parameters: int = 0
    quantization: str = "float"
    memory_bytes: int = 0
    paging: str | None = None  # "4/8 experts per layer in memory" within --max-memory
    is_moe: bool = False
    layers: int = 0
    experts: int = 0
    top_k: int = 0
    context: int = 0
    window: int | None = None
    chat_format: str = ""
    server: str | None = None  # chat --server: the model runs there
    source: str = ""  # the model as a chat records it: its path or repo id, or a server's id
    # Its own sampling defaults, for the settings the user did not set (a server keeps its own).
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    def describe(self) -> str:
        if self.server:
            return f"{self.name} at {self.server}"
        moe = (f", {self.experts} experts (top-{self.top_k}), "
               f"{human(self.active_parameters, 'B')} active" if self.is_moe else "")
        return (f"{self.name}: {human(self.parameters, 'B')} parameters{moe}, "
                f"{self.quantization}, {gb(self.memory_bytes)} in memory"
                + (f" ({self.paging})" if self.paging else ""))


@dataclass(frozen=True)
class Prompt:
    """What an engine answers: the conversation so far (user and assistant turns, the last one
    the user's when a reply is wanted), its system prompt, and the stored chat it belongs to
    (what the engine keeps of it is kept under that key; None: not stored yet)."""

    messages: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Prefill:
    """How far the engine has read a prompt: `done` of `total` new tokens."""

    done: int
    total: int


@dataclass(frozen=True)
class Ready:
    """An opened chat is read into the cache (which then holds `context` tokens)."""

    context: int


Event = Chunk | Prefill | Ready | Stats  # what the worker hands the app
Emit = Callable[[Event], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class ModelList:
    """What Ctrl+O offers: the models an engine can switch to, and where they are."""

    models: list[LocalModel]
    available: int = 0  # bytes of memory free for a model (0: not known, as for a server's)
    server: str | None = None  # the server that serves them (None: on this machine)


class Engine(Protocol):
    info: EngineInfo

    def load(self, progress: Callable[[float], None]) -> EngineInfo: ...

    def select(self, name: str) -> None: ...  # the model the next `load` loads

    def models(self) -> ModelList:
        """What Ctrl+O offers. It touches no model, so it may run on a thread of its own."""
        ...

    def prefill(self, prompt: Prompt, emit: Emit, should_stop: ShouldStop) -> int:
        """Read `prompt` into the cache before the next message; return the tokens it holds."""
        ...

    def forget(self, key: str) -> None:
        """The chat stored under `key` was deleted: drop all the engine keeps of it."""
        ...

    def reply(self, prompt: Prompt, settings: SamplingParams, emit: Emit,
              should_stop: ShouldStop) -> None:
        """Answer `prompt`: emit its chunks, then one `Stats` (raising is a failed reply)."""
        ...
