"""The converter behind `mlx-mixtral convert`: Hugging Face weights -> (quantized) MLX folder."""

from .plan import Plan
from .run import ConvertError, Summary, convert

__all__ = ["ConvertError", "Plan", "Summary", "convert"]
