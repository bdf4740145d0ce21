"""mlx-mixtral: Mistral 7B and Mixtral 8x7B / 8x22B on MLX.

The public API is importable from here. It is loaded on first use (PEP 562), so that
`import mlx_mixtral` and `mlx-mixtral --help` stay instant: mlx-lm, which the model builds on,
imports transformers when it is first imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "ChatFormatError": "errors", "ConfigError": "errors", "ConvertError": "errors",
    "GenerationError": "errors", "MemoryLimitError": "errors", "MlxMixtralError": "errors",
    "SamplingError": "errors", "StoreError": "errors", "TokenizerError": "errors",
    "WeightsError": "errors",
    "PRESETS": "model", "KVCache": "model", "Model": "model", "ModelArgs": "model",
    "RotatingKVCache": "model", "RouterTrace": "model", "load_balancing_loss": "model",
    "preset": "model",
    "Tokenizer": "text",
    "load": "loading", "load_model": "loading",
    "ChatSession": "generation", "Chunk": "generation", "SamplingParams": "generation",
    "Stats": "generation", "batch_generate": "generation", "generate": "generation",
    "stream_generate": "generation",
}
__all__ = ["ChatFormatError", "ChatSession", "Chunk", "ConfigError", "ConvertError",
           "GenerationError", "KVCache", "MemoryLimitError", "MlxMixtralError", "Model",
           "ModelArgs", "PRESETS", "RotatingKVCache", "RouterTrace", "SamplingError",
           "SamplingParams", "Stats", "StoreError", "Tokenizer", "TokenizerError", "WeightsError",
           "batch_generate", "generate", "load", "load_balancing_loss", "load_model", "preset",
           "stream_generate"]

if TYPE_CHECKING:
    from .errors import (
        ChatFormatError,
        ConfigError,
        ConvertError,
        GenerationError,
        MemoryLimitError,
        MlxMixtralError,
        SamplingError,
        StoreError,
        TokenizerError,
        WeightsError,
    )
    from .generation import (
        ChatSession,
        Chunk,
        SamplingParams,
        Stats,
        batch_generate,
        generate,
        stream_generate,
    )
    from .loading import load, load_model
    from .model import (
        PRESETS,
        KVCache,
        Model,
        ModelArgs,
        RotatingKVCache,
        RouterTrace,
        load_balancing_loss,
        preset,
    )
    from .text import Tokenizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
