"""The converter behind `mlx-mixtral convert`: Hugging Face weights -> (quantized) MLX folder."""

from ..errors import ConvertError
from .plan import Plan
from .run import Summary, convert

__all__ = ["ConvertError", "Plan", "Summary", "convert"]
