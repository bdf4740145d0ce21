"""mlx-mixtral: Mistral 7B and Mixtral 8x7B / 8x22B on MLX."""

from .cache import KVCache, RotatingKVCache
from .config import PRESETS, ModelArgs, preset
from .errors import ConfigError, MlxMixtralError, WeightsError
from .loader import TokenizerError, load
from .model import Model
from .routing import RouterTrace, load_balancing_loss
from .weights import load_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ConfigError",
    "KVCache",
    "MlxMixtralError",
    "Model",
    "ModelArgs",
    "RotatingKVCache",
    "RouterTrace",
    "TokenizerError",
    "WeightsError",
    "load",
    "load_balancing_loss",
    "load_model",
    "preset",
]
