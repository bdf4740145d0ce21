"""The command line: `mlx-mixtral chat | generate | convert | info | bench`."""

from .flags import sampling_from
from .main import build_parser, main

__all__ = ["build_parser", "main", "sampling_from"]
