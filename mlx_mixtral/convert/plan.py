"""Which precision each tensor gets when a checkpoint is converted.

- Expert and attention projections: the chosen bits (default 4, group 64, affine).
- Embeddings and the output head: at least 6 bits; they see every token and, unlike a single
  expert, their errors are never averaged away (llama.cpp's Q4_K_M keeps the output at 6 bits).
- The router gate: never quantized. It is tiny (experts x hidden) and routing is sensitive:
  a flipped expert choice changes a token's whole FFN output (mlx-lm quantizes it to 4 bits).
- Norms and anything one-dimensional: unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
HEAD_MIN_BITS = 6


@dataclass(frozen=True)
class Plan:
    dtype: mx.Dtype
    bits: int | None = None  # None: no quantization
    group_size: int = 64
    mode: str = "affine"

    def bits_for(self, module: str, weight: mx.array) -> int | None:
        """Bits for the `module` whose `weight` this is, or None to keep it in float."""
        if self.bits is None or weight.ndim < 2 or module.endswith("block_sparse_moe.gate"):
            return None
        if weight.shape[-1] % self.group_size:
            return None  # cannot be grouped: keep float
        if module in ("model.embed_tokens", "lm_head"):
            return max(self.bits, HEAD_MIN_BITS)
        return self.bits

    def config_entry(self, layers: dict[str, int | None]) -> dict | None:
        """mlx-lm's `quantization` config: defaults, then each layer that differs."""
        if self.bits is None:
            return None
        entry: dict = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        for module, bits in sorted(layers.items()):
            if bits is None:
                entry[module] = False
            elif bits != self.bits:
                entry[module] = {"group_size": self.group_size, "bits": bits, "mode": self.mode}
        return entry
