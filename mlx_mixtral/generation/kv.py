"""How keys and values are kept: quantized or not, from which token on.

At 8 bits the KV cache takes about half the memory of float16, at 4 bits about a quarter (plus a
scale and a bias per group). Attention reads the quantized cache as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import GenerationError

# Bytes of KV caches kept for later by default: the server's between requests, the app's
# saved conversations.
PROMPT_CACHE_BYTES = 2 * 10**9
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVSettings:
    bits: int | None = None  # None: keys and values in the model's dtype
    group_size: int = 64
    start: int = 0  # quantize once the cache holds this many tokens

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in KV_BITS:
            raise GenerationError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, "
                                  f"got {self.bits}", params=("kv_bits",))
        if self.group_size not in KV_GROUP_SIZES:
            raise GenerationError("kv_group_size must be one of "
                                  f"{', '.join(map(str, KV_GROUP_SIZES))}, got {self.group_size}",
                                  params=("kv_group_size",))
        if not isinstance(self.start, int) or self.start < 0:
            raise GenerationError(f"quantized_kv_start must be >= 0, got {self.start}",
                                  params=("quantized_kv_start",))

    def check(self, head_dim: int) -> None:
        if self.bits is not None and head_dim % self.group_size:
            fitting = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
            advice = (f"use {' or '.join(f'kv_group_size={g}' for g in fitting)}" if fitting
                      else "none of 32, 64, 128 does: this model's KV cache cannot be quantized")
            raise GenerationError(f"kv_group_size={self.group_size} does not divide the "
                                  f"model's head dimension ({head_dim}); {advice}",
                                  params=("kv_group_size",))

    def step_kwargs(self) -> dict[str, Any]:
        """mlx-lm's `generate_step` arguments."""
        return {"kv_bits": self.bits, "kv_group_size": self.group_size,
                "quantized_kv_start": self.start}


def kv_settings(kv: KVSettings | None = None, kv_bits: int | None = None,
                kv_group_size: int | None = None,
                quantized_kv_start: int | None = None) -> KVSettings:
    """`kv`, or the same settings given with mlx-lm's keyword names (never both: one of them
    would be silently ignored)."""
    given = {name: value for name, value in (("bits", kv_bits), ("group_size", kv_group_size),
                                             ("start", quantized_kv_start)) if value is not None}
    if kv is not None and given:
        raise GenerationError("give the KV settings once: kv=KVSettings(...) or mlx-lm's "
                              "kv_bits, kv_group_size and quantized_kv_start, not both")
    return kv if kv is not None else KVSettings(**given)
