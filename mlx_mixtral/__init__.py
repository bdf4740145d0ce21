"""mlx-mixtral: Mistral 7B and Mixtral 8x7B / 8x22B on MLX."""

from .cache import KVCache, RotatingKVCache
from .chat_session import ChatSession
from .config import PRESETS, ModelArgs, preset
from .errors import ChatFormatError, ConfigError, MlxMixtralError, TokenizerError, WeightsError
from .generate import Chunk, Stats, batch_generate, generate, stream_generate
from .loader import load
from .memory import MemoryLimitError
from .model import Model
from .routing import RouterTrace, load_balancing_loss
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import load_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ChatSession",
    "Chunk",
    "SamplingParams",
    "Stats",
    "batch_generate",
    "generate",
    "stream_generate",
    "ChatFormatError",
    "ConfigError",
    "KVCache",
    "MemoryLimitError",
    "MlxMixtralError",
    "Model",
    "ModelArgs",
    "RotatingKVCache",
    "RouterTrace",
    "Tokenizer",
    "TokenizerError",
    "WeightsError",
    "load",
    "load_balancing_loss",
    "load_model",
    "preset",
]
