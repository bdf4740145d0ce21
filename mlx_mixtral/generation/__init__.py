"""Generation: sampling settings, streaming and batch generation, the chat session that keeps
its KV cache between turns, and the statistics of a reply."""

from .batch import batch_generate
from .sampling import SamplingParams
from .session import ChatSession
from .stats import Stats
from .stream import Chunk, generate, stream_generate

__all__ = ["ChatSession", "Chunk", "SamplingParams", "Stats", "batch_generate", "generate",
           "stream_generate"]
