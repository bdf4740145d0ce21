"""The model: configuration, attention and its window masks, KV caches, the MoE layer and its
router, and the decoder. Depends only on mlx and mlx-lm's model pieces."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "FullKVCache": "cache",
    "RollingKVCache": "cache",
    "PRESETS": "config",
    "ModelArgs": "config",
    "preset": "config",
    "Model": "decoder",
    "RouterTrace": "routing",
    "load_balancing_loss": "routing",
}
__all__ = ["FullKVCache", "Model", "ModelArgs", "PRESETS", "RollingKVCache", "RouterTrace",
           "load_balancing_loss", "preset"]

if TYPE_CHECKING:
    from .cache import FullKVCache, RollingKVCache
    from .config import PRESETS, ModelArgs, preset
    from .decoder import Model
    from .routing import RouterTrace, load_balancing_loss

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
