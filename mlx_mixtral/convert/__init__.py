"""The converter behind `mlx-mixtral convert`: Hugging Face weights -> (quantized) MLX folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"ConvertError": "run", "Plan": "plan", "Summary": "run", "convert": "run"}
__all__ = ["ConvertError", "Plan", "Summary", "convert"]

if TYPE_CHECKING:
    from .plan import Plan
    from .run import ConvertError, Summary, convert

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
