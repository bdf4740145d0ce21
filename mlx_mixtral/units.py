"""Numbers for people: 46.7B parameters, 26.3 GB."""

from __future__ import annotations


def human(n: float, giga: str = "G") -> str:
    """1234567 -> '1.23M' (K, M, G, T by powers of 1000; giga="B" for parameter counts)."""
    for unit, scale in (("T", 1e12), (giga, 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def size(n: float) -> str:
    """Bytes in GB, or in MB below one GB (so that small sizes do not read 0.0 GB)."""
    return gb(n) if n >= 1e9 else f"{n / 1e6:.1f} MB"
