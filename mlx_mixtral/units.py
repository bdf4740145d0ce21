"""Numbers for people: 46.7B parameters, 26.3 GB."""

from __future__ import annotations


def human(n: float, giga: str = "G") -> str:
    """1234567 -> '1.23M' (K, M, G, T by powers of 1000; giga="B" for parameter counts)."""
    for unit, scale in (("T", 1e12), (giga, 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def count(n: int, word: str) -> str:
    """1, "token" -> '1 token'; 2, "token" -> '2 tokens'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def size(n: float) -> str:
    """Bytes in the largest decimal unit that keeps the number at 1 or more (GB, MB, KB), so
    that no size reads 0.0; every command writes sizes this way."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'16GB', '12.5G', '800 MB', '24GiB' -> bytes (decimal units unless ...iB); ValueError
    for anything else, or for a size that is not positive."""
    import re

    m = re.fullmatch(r"\s*(-?\s*(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 16GB, 12.5GB or 800MB")
    value = int(float(m.group(1).replace(" ", "")) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be more than 0")
    return value
