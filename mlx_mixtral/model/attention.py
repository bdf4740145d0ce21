"""Grouped-query self-attention with RoPE, over a full or a sliding-window KV cache."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from .cache import Buffer, over
from .config import ModelArgs
from .fusion import fuse_linears
from .masks import Mask, WindowBand
from .packing import PackedLayer


def _sdpa(q: mx.array, k: Buffer, v: Buffer, scale: float, mask: Mask, cache: object) -> mx.array:
    if isinstance(k, tuple):  # quantized keys and values, read as they are
        return quantized_scaled_dot_product_attention(
            q, k, v, scale=scale, mask=mask, group_size=cache.group_size, bits=cache.bits)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def attend(q: mx.array, k: Buffer, v: Buffer, scale: float, mask: Mask,
           cache: object = None) -> mx.array:
    """Scaled dot-product attention; a `WindowBand` runs block by block over the keys each
    block of queries can see. The kernel broadcasts the KV heads over their query groups: no
    repeated K/V in memory."""
    if not isinstance(mask, WindowBand):
        return _sdpa(q, k, v, scale, mask, cache)
    return mx.concatenate([
        _sdpa(q[:, :, qs], over(k, lambda x, ks=ks: x[:, :, ks]),
              over(v, lambda x, ks=ks: x[:, :, ks]), scale, m, cache)
        for qs, ks, m in mask.blocks(q.shape[2])], axis=2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta = args.rope_theta
        h = args.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        # traditional=False: Hugging Face's rotate-half layout of q/k weights.
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta,
                            scale=1.0, offset=offset)

    def fuse(self) -> None:
        """Compute q, k and v with one projection (see fusion.py)."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        if "qkv_proj" in self:
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            return tuple(mx.split(self.qkv_proj(x), [q_size, q_size + kv_size], axis=-1))
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def __call__(self, x: mx.array, mask: Mask = None, cache=None) -> mx.array:
        b, length, _ = x.shape
        q, k, v = self._project(x)
        q = q.reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if isinstance(cache, PackedLayer):  # each sequence over its own cache (packing.py)
            out, at = [], 0
            for n, c, m in zip(cache.lengths, cache.caches, cache.masks, strict=True):
                part = slice(at, at + n)
                out.append(self._attend(q[:, :, part], k[:, :, part], v[:, :, part], m, c))
                at += n
            out = mx.concatenate(out, axis=2) if len(out) > 1 else out[0]
        else:
            out = self._attend(q, k, v, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Mask, cache) -> mx.array:
        offset = 0 if cache is None else cache.offset
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attend(q, k, v, self.scale, mask, cache)
