"""The command line: `mlx-mixtral chat | generate | convert | info | bench`."""

from .main import build_parser, main, sampling_from

__all__ = ["build_parser", "main", "sampling_from"]
