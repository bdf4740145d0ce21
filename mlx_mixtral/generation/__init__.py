"""Generation: sampling settings, streaming and batch generation, the chat session that keeps
its KV cache between turns, and the statistics of a reply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "batch_generate": "batch",
    "SamplingParams": "sampling",
    "ChatSession": "session",
    "Stats": "stats",
    "Chunk": "stats",
    "generate": "stream",
    "stream_generate": "stream",
}
__all__ = ["ChatSession", "Chunk", "SamplingParams", "Stats", "batch_generate", "generate",
           "stream_generate"]

if TYPE_CHECKING:
    from .batch import batch_generate
    from .sampling import SamplingParams
    from .session import ChatSession
    from .stats import Chunk, Stats
    from .stream import generate, stream_generate

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
