"""The model: configuration, attention and its window masks, KV caches, the MoE layer and its
router, and the decoder. Depends only on mlx and mlx-lm's model pieces."""

from .cache import KVCache, RotatingKVCache
from .config import PRESETS, ModelArgs, preset
from .decoder import Model
from .routing import RouterTrace, load_balancing_loss

__all__ = ["PRESETS", "KVCache", "Model", "ModelArgs", "RotatingKVCache", "RouterTrace",
           "load_balancing_loss", "preset"]
