"""Which precision each tensor gets when a checkpoint is converted.

- Attention projections: the chosen bits (default 4, group 64, affine).
- Experts: their own bits when given (`--expert-bits`, or a recipe such as `mixed-3-4`), else
  the same. They are 97% of Mixtral's weights, and each sees only its share of the tokens, so
  they are where bits are saved first; attention sees every token and is 2% of the size. In
  a dense model the MLP stands in for the experts.
- Embeddings and the output head: at least 6 bits; they see every token and, unlike a single
  expert, their errors are never averaged away (llama.cpp's Q4_K_M keeps the output at 6 bits).
- The router gate: never quantized. It is tiny (experts x hidden) and routing is sensitive:
  a flipped expert choice changes a token's whole FFN output (mlx-lm quantizes it to 4 bits).
- Norms and anything one-dimensional: unquantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from ..model.config import ModelArgs

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
HEAD_MIN_BITS = 6
# name -> (expert bits, attention bits)
RECIPES = {"mixed-4-6": (4, 6), "mixed-3-4": (3, 4), "mixed-2-4": (2, 4), "mixed-2-3": (2, 3)}
FFN_MARKS = (".switch_mlp.", ".block_sparse_moe.experts.", ".mlp.")


def is_ffn(module: str) -> bool:
    """An expert (stacked or per-expert), or a dense model's MLP."""
    return any(mark in module + "." for mark in FFN_MARKS)


def recipe_bits(name: str) -> tuple[int, int]:
    """(expert bits, attention bits) of a named recipe; ConvertError lists them otherwise."""
    from ..errors import ConvertError

    if name not in RECIPES:
        raise ConvertError(f"unknown recipe {name!r}; the recipes are "
                           + ", ".join(f"{k} (experts {e}-bit, attention {a}-bit)"
                                       for k, (e, a) in RECIPES.items()))
    return RECIPES[name]


@dataclass(frozen=True)
class Plan:
    dtype: mx.Dtype
    bits: int | None = None  # None: no quantization
    group_size: int = 64
    mode: str = "affine"
    expert_bits: int | None = None  # None: the same as `bits`

    def bits_for(self, module: str, shape: tuple[int, ...]) -> int | None:
        """Bits for the `module` whose weight has this shape, or None to keep it in float."""
        if self.bits is None or len(shape) < 2 or module.endswith("block_sparse_moe.gate"):
            return None
        if shape[-1] % self.group_size:
            return None  # cannot be grouped: keep float
        if module in ("model.embed_tokens", "lm_head"):
            return max(self.bits, HEAD_MIN_BITS)
        if self.expert_bits is not None and is_ffn(module):
            return self.expert_bits
        return self.bits

    def estimate_bytes(self, args: ModelArgs) -> int:
        """The converted weights' size by formula: each quantized weight's bits, plus a scale
        and a bias (in `dtype`) per group; float tensors at `dtype`."""
        return sum(self.estimate_parts(args))

    def estimate_parts(self, args: ModelArgs) -> tuple[int, int]:
        """`estimate_bytes` split into (the experts, everything else)."""
        from ..loading.expert_files import is_expert_tensor
        from .synthetic import hf_tensor_shapes

        parts = [0, 0]
        for name, shape in hf_tensor_shapes(args):
            count = math.prod(shape)
            bits = self.bits_for(name.rpartition(".")[0], shape)
            if bits is None:
                nbytes = count * self.dtype.size
            else:
                nbytes = count * bits // 8 + count // self.group_size * 2 * self.dtype.size
            parts[0 if is_expert_tensor(name) else 1] += nbytes
        return parts[0], parts[1]

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
