"""Key/value caches: a growing one for full attention, a rolling one for sliding windows.

Both implement mlx-lm's cache protocol (`offset`, `update_and_fetch`, `state` and `meta_state`
with setters, `from_state`, `size`, `empty`, `is_trimmable`, `trim`, `nbytes`, `make_mask`,
`to_quantized`), so mlx-lm's generation loop drives them, its `kv_bits` included. Their class
names differ from mlx-lm's on purpose: a file naming one can never be rebuilt as the other.
Prompt-cache files are `prompt_cache.py`'s business.

Keys and values are kept in the model's dtype, or quantized (`to_quantized`): then each buffer
is mlx-lm's triple (packed, scales, biases) and attention reads it as it is, never dequantized
into a full-size copy. Keys are stored after RoPE, so a cached key never needs its position
again. Each cache also builds the attention mask for the keys its next `update_and_fetch` will
return; the model asks the first layer's cache once per forward pass (layers move in lockstep).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .masks import Mask, windowed_mask

# A buffer of keys or values: (batch, kv_heads, positions, head_dim), or quantized as
# (packed, scales, biases) with the same leading axes.
Buffer = mx.array | tuple[mx.array, mx.array, mx.array]


def parts(buffer: Buffer) -> tuple[mx.array, ...]:
    return buffer if isinstance(buffer, tuple) else (buffer,)


def over(buffer: Buffer, f: Callable[[mx.array], mx.array]) -> Buffer:
    """`f` applied to each array of a buffer (a slice, a concatenation ...)."""
    return tuple(f(x) for x in buffer) if isinstance(buffer, tuple) else f(buffer)


def concat(a: Buffer, b: Buffer) -> Buffer:
    if isinstance(a, tuple):
        return tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b, strict=True))
    return mx.concatenate([a, b], axis=2)


class _Cache:
    """What both caches share: the buffers, the position count, quantization, the protocol."""

    step = 256

    def __init__(self) -> None:
        self.keys: Buffer | None = None
        self.values: Buffer | None = None
        self.offset = 0
        self.group_size = 64
        self.bits: int | None = None  # None: keys and values in the model's dtype

    # ---- storage --------------------------------------------------------------------------

    def _encode(self, x: mx.array) -> Buffer:
        if self.bits is None:
            return x
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _zeros(self, like: mx.array, capacity: int) -> Buffer:
        b, h, _, d = like.shape
        if self.bits is None:
            return mx.zeros((b, h, capacity, d), like.dtype)
        groups = d // self.group_size
        return (mx.zeros((b, h, capacity, d * self.bits // 32), mx.uint32),
                mx.zeros((b, h, capacity, groups), like.dtype),
                mx.zeros((b, h, capacity, groups), like.dtype))

    @staticmethod
    def _put(buffer: Buffer, at: int, new: Buffer) -> None:
        """Write `new` into positions at.. of `buffer`, in place."""
        for dst, src in zip(parts(buffer), parts(new), strict=True):
            dst[..., at:at + src.shape[2], :] = src

    @staticmethod
    def _slice(buffer: Buffer, start: int, stop: int) -> Buffer:
        return over(buffer, lambda x: x[..., start:stop, :])

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else parts(self.keys)[0].shape[2]

    def _grow(self, keys: mx.array, values: mx.array, size: int, limit: int | None) -> None:
        """Make the buffers hold at least `size` positions (in steps, at most `limit`)."""
        have = self.capacity
        if size <= have:
            return
        capacity = ((size + self.step - 1) // self.step) * self.step
        if limit is not None:
            capacity = min(capacity, limit)
        new_k, new_v = self._zeros(keys, capacity), self._zeros(values, capacity)
        if have:
            self._put(new_k, 0, self._slice(self.keys, 0, have))
            self._put(new_v, 0, self._slice(self.values, 0, have))
        self.keys, self.values = new_k, new_v

    # ---- protocol ---------------------------------------------------------------------------

    def is_trimmable(self) -> bool:
        return True

    def empty(self) -> bool:
        return self.keys is None

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*parts(self.keys), *parts(self.values)))

    def to_quantized(self, group_size: int = 64, bits: int = 8) -> _Cache:
        """This cache with keys and values quantized (itself if it already is)."""
        if self.bits is not None:
            return self
        quantized = copy.copy(self)
        quantized.group_size, quantized.bits = group_size, bits
        if self.keys is not None:
            quantized.keys = quantized._encode(self.keys)
            quantized.values = quantized._encode(self.values)
        return quantized

    def _quant_meta(self) -> tuple[str, str]:
        return str(self.group_size), "" if self.bits is None else str(self.bits)

    def _set_quant_meta(self, group_size: str, bits: str) -> None:
        self.group_size, self.bits = int(group_size), (int(bits) if bits else None)

    @classmethod
    def from_state(cls, state: Any, meta_state: tuple[str, ...] | None = None) -> _Cache:
        """A cache holding `state` (and `meta_state`, our positions and quantization)."""
        cache = cls.__new__(cls)
        _Cache.__init__(cache)
        if meta_state is not None:
            cache.meta_state = meta_state
        cache.state = state
        return cache

    def make_mask(self, N: int, return_array: bool = False,  # noqa: N803 - mlx-lm's name
                  window_size: int | None = None) -> Mask:
        """The mask for the keys the next `update_and_fetch` of N queries returns."""
        mask = self._mask(N, window_size)
        if not return_array or isinstance(mask, mx.array):
            return mask
        q = mx.arange(self.offset, self.offset + N)[:, None]
        k = self.key_positions(N)[None]
        visible = k <= q
        if window_size is not None:
            visible = visible & (k > q - window_size)
        return visible & (k >= getattr(self, "start", 0))

    def _mask(self, num_queries: int, window: int | None) -> Mask:
        raise NotImplementedError

    # ---- positions, for the prefix store (`prefixes/`) ------------------------------------------

    def held(self) -> tuple[int, int]:
        """(first, end): the positions first..end-1 whose keys and values this cache holds."""
        raise NotImplementedError

    def positions(self, first: int, end: int) -> tuple[Buffer, Buffer]:
        """Keys and values of held positions first..end-1, in order."""
        raise NotImplementedError

    def needs(self, end: int) -> int:
        """The first position whose keys and values must be held to go on from `end`."""
        raise NotImplementedError

    def fill(self, first: int, keys: Buffer, values: Buffer, group_size: int,
             bits: int | None) -> None:
        """Make this (empty) cache hold positions first.. given in order, as if computed."""
        raise NotImplementedError

    def key_positions(self, num_queries: int) -> mx.array:
        raise NotImplementedError


class FullKVCache(_Cache):
    """Full-attention cache; grows in steps of `step` positions."""

    def __init__(self) -> None:
        super().__init__()

    def _mask(self, num_queries: int, window: int | None) -> Mask:
        return windowed_mask(self.offset, num_queries, 0, self.offset + num_queries, window)

    def key_positions(self, num_queries: int) -> mx.array:
        """Positions of the keys the next `update_and_fetch` of that many queries returns."""
        return mx.arange(self.offset + num_queries)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer]:
        end = self.offset + keys.shape[2]
        self._grow(keys, values, end, None)
        self._put(self.keys, self.offset, self._encode(keys))
        self._put(self.values, self.offset, self._encode(values))
        self.offset = end
        return self._slice(self.keys, 0, end), self._slice(self.values, 0, end)

    @property
    def state(self) -> tuple[Buffer, Buffer] | list:
        if self.keys is None:
            return []
        return self._slice(self.keys, 0, self.offset), self._slice(self.values, 0, self.offset)

    @state.setter
    def state(self, value: tuple[Buffer, Buffer]) -> None:
        self.keys, self.values = value if value else (None, None)
        self.offset = 0 if self.keys is None else parts(self.keys)[0].shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset), *self._quant_meta())

    @meta_state.setter
    def meta_state(self, value: tuple[str, ...]) -> None:
        self.offset = int(value[0])
        self._set_quant_meta(*value[1:3])

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def held(self) -> tuple[int, int]:
        return 0, self.offset

    def positions(self, first: int, end: int) -> tuple[Buffer, Buffer]:
        return self._slice(self.keys, first, end), self._slice(self.values, first, end)

    def needs(self, end: int) -> int:
        return 0

    def fill(self, first: int, keys: Buffer, values: Buffer, group_size: int,
             bits: int | None) -> None:
        if first != 0:
            raise ValueError("a full cache holds every position from 0")
        self.group_size, self.bits = group_size, bits
        self.state = (keys, values)


class RollingKVCache(_Cache):
    """Sliding-window cache: memory stops at the window (plus `slack`) per layer.

    Position p lives in slot p % (window + slack). Decoding writes one slot and attends to the
    buffer as is (attention does not care about key order). A multi-token chunk attends to the
    previous window-1 positions, gathered in order, plus itself; only its last
    window + slack positions are stored, so memory stays flat also during a chunked prefill.

    `slack` keeps that many positions beyond the window, masked out: a trim of up to `slack`
    tokens (rejected draft tokens) then brings back exactly what the window needs. A trim
    beyond what is held cannot bring back positions that were overwritten: the cache then holds
    fewer than `window` past positions, masks the trimmed slots out, and `complete` turns False
    until decoding has moved a full window past the lost positions.
    """

    def __init__(self, window: int, slack: int = 0) -> None:
        if window <= 0 or slack < 0:
            raise ValueError(f"window must be positive and slack >= 0, got {window}, {slack}")
        super().__init__()
        self.window, self.slack = window, slack
        self.start = 0  # oldest position whose key is still valid (moves up only via trim)

    @property
    def ring(self) -> int:
        return self.window + self.slack

    # ---- masks -------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether every key the next query may see (its whole window) is held."""
        return self.start <= max(0, self.offset + 1 - self.window)

    def _first_visible(self, position: int) -> int:
        return max(self.start, position - self.window + 1)

    def _mask(self, num_queries: int, window: int | None = None) -> Mask:
        if num_queries > 1:
            lo = self._first_visible(self.offset)
            return windowed_mask(self.offset, num_queries, lo,
                                 self.offset + num_queries - lo, self.window)
        if self.complete and (self.slack == 0 or self.offset < self.window):
            return None  # every returned slot is within the window and valid
        # Slack slots hold positions past the window; after a trim of a wrapped buffer, slots
        # may hold trimmed positions: hide both.
        k = self.key_positions(1)
        return ((k >= self._first_visible(self.offset)) & (k <= self.offset))[None]

    def key_positions(self, num_queries: int) -> mx.array:
        """Positions of the keys the next `update_and_fetch` of that many queries returns
        (for one query: the ring's slots, each holding the latest position that maps to it)."""
        if num_queries > 1:
            return mx.arange(self._first_visible(self.offset), self.offset + num_queries)
        slot = mx.arange(min(self.offset + 1, self.ring))
        return self.offset - (self.offset - slot) % self.ring

    # ---- update -------------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer]:
        if keys.shape[2] == 1:
            return self._update_one(keys, values)
        return self._update_many(keys, values)

    def _update_one(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer]:
        slot = self.offset % self.ring
        self._grow(keys, values, slot + 1, self.ring)
        self._put(self.keys, slot, self._encode(keys))
        self._put(self.values, slot, self._encode(values))
        self.offset += 1
        used = min(self.offset, self.ring)
        return self._slice(self.keys, 0, used), self._slice(self.values, 0, used)

    def _update_many(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer]:
        length = keys.shape[2]
        new_k, new_v = self._encode(keys), self._encode(values)
        lo = self._first_visible(self.offset)
        past_k, past_v = self._ordered(lo, self.offset)
        out_k = new_k if past_k is None else concat(past_k, new_k)
        out_v = new_v if past_v is None else concat(past_v, new_v)

        kept = min(length, self.ring)
        first = self.offset + length - kept  # position of the first stored new key
        self._grow(keys, values, min(first + kept, self.ring), self.ring)
        tail = length - kept
        self._write(first, self._slice(new_k, tail, length), self._slice(new_v, tail, length))
        self.offset += length
        return out_k, out_v

    def _write(self, first: int, keys: Buffer, values: Buffer) -> None:
        """Store consecutive positions first.. into their slots (wrapping at most once)."""
        count = parts(keys)[0].shape[2]
        s0 = first % self.ring
        head = min(count, self.ring - s0)
        self._put(self.keys, s0, self._slice(keys, 0, head))
        self._put(self.values, s0, self._slice(values, 0, head))
        if head < count:
            self._put(self.keys, 0, self._slice(keys, head, count))
            self._put(self.values, 0, self._slice(values, head, count))

    def _ordered(self, lo: int, hi: int) -> tuple[Buffer | None, Buffer | None]:
        """Keys and values of positions lo..hi-1 in order (hi - lo <= ring)."""
        if hi <= lo:
            return None, None
        s0, s1 = lo % self.ring, (hi - 1) % self.ring + 1
        if s0 < s1:
            return self._slice(self.keys, s0, s1), self._slice(self.values, s0, s1)
        end = self.capacity
        k = concat(self._slice(self.keys, s0, end), self._slice(self.keys, 0, s1))
        v = concat(self._slice(self.values, s0, end), self._slice(self.values, 0, s1))
        return k, v

    # ---- protocol -----------------------------------------------------------------------------

    @property
    def state(self) -> tuple[Buffer, Buffer] | list:
        if self.keys is None:
            return []
        used = min(self.offset, self.capacity)
        return self._slice(self.keys, 0, used), self._slice(self.values, 0, used)

    @state.setter
    def state(self, value: tuple[Buffer, Buffer]) -> None:
        self.keys, self.values = value if value else (None, None)

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (*map(str, (self.window, self.offset, self.start, self.slack)),
                *self._quant_meta())

    @meta_state.setter
    def meta_state(self, value: tuple[str, ...]) -> None:
        self.window, self.offset, self.start, self.slack = map(int, value[:4])
        self._set_quant_meta(*value[4:6])

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        new_offset = self.offset - n
        # Slots of positions >= new_offset now hold stale keys; positions that were
        # overwritten by them are gone for good.
        self.start = min(max(self.start, self.offset - self.ring), new_offset)
        self.offset = new_offset
        return n

    def held(self) -> tuple[int, int]:
        return max(self.start, self.offset - self.ring, 0), self.offset

    def positions(self, first: int, end: int) -> tuple[Buffer, Buffer]:
        return self._ordered(first, end)

    def needs(self, end: int) -> int:
        # The next chunk of queries attends to the window's positions before it.
        return max(0, end - self.window + 1)

    def fill(self, first: int, keys: Buffer, values: Buffer, group_size: int,
             bits: int | None) -> None:
        count = parts(keys)[0].shape[2]
        if count > self.ring:
            first, keys, values = (first + count - self.ring, self._slice(keys, count - self.ring,
                                   count), self._slice(values, count - self.ring, count))
            count = self.ring
        self.group_size, self.bits = group_size, bits
        end = first + count
        capacity = min(self.ring, end)  # as a cold cache at this offset has at least

        def empty(x: mx.array) -> mx.array:
            return mx.zeros((*x.shape[:2], capacity, x.shape[3]), x.dtype)

        self.keys, self.values = over(keys, empty), over(values, empty)
        self.offset, self.start = end, first
        self._write(first, keys, values)


CACHE_CLASSES = {cls.__name__: cls for cls in (FullKVCache, RollingKVCache)}
