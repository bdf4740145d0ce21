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
    "WeightsError": "errors", "DistributedError": "errors",
    "PRESETS": "model", "FullKVCache": "model", "Model": "model", "ModelArgs": "model",
    "RollingKVCache": "model", "RouterTrace": "model", "load_balancing_loss": "model",
    "preset": "model",
    "Tokenizer": "text",
    "load": "loading", "load_model": "loading",
    "ChatSession": "generation", "Chunk": "generation", "SamplingParams": "generation",
    "Stats": "generation", "batch_generate": "generation", "generate": "generation",
    "stream_generate": "generation",
    "KVSettings": "generation.kv", "LookupDrafter": "generation.speculative",
    "ModelDrafter": "generation.speculative", "PromptCacheError": "errors",
    "save_prompt_cache": "loading.prompt_cache", "load_prompt_cache": "loading.prompt_cache",
}
__all__ = ["ChatFormatError", "ChatSession", "Chunk", "ConfigError", "ConvertError",
           "DistributedError",
           "FullKVCache", "GenerationError", "KVSettings", "LookupDrafter", "MemoryLimitError",
           "MlxMixtralError", "Model", "ModelArgs", "ModelDrafter", "PRESETS", "PromptCacheError",
           "RollingKVCache", "RouterTrace", "SamplingError", "SamplingParams", "Stats",
           "StoreError", "Tokenizer", "TokenizerError", "WeightsError", "batch_generate",
           "generate", "load", "load_balancing_loss", "load_model", "load_prompt_cache", "preset",
           "save_prompt_cache", "stream_generate"]

if TYPE_CHECKING:
    from .errors import (
        ChatFormatError,
        ConfigError,
        ConvertError,
        DistributedError,
        GenerationError,
        MemoryLimitError,
        MlxMixtralError,
        PromptCacheError,
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
    from .generation.kv import KVSettings
    from .generation.speculative import LookupDrafter, ModelDrafter
    from .loading import load, load_model
    from .loading.prompt_cache import load_prompt_cache, save_prompt_cache
    from .model import (
        PRESETS,
        FullKVCache,
        Model,
        ModelArgs,
        RollingKVCache,
        RouterTrace,
        load_balancing_loss,
        preset,
    )
    from .text import Tokenizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
