"""Key/value caches: a growing one for full attention, a rolling one for sliding windows.

Both follow the parts of mlx-lm's cache protocol its generation loop uses (`offset`,
`update_and_fetch`, `state`, `is_trimmable`, `trim`, `nbytes`). mlx-lm's prompt-cache files
(`save_prompt_cache` / `load_prompt_cache`) do not round-trip them yet: their `meta_state` and
class names differ from mlx-lm's.

Each cache also builds the attention mask for the keys its next `update_and_fetch` will return;
the model asks the first layer's cache once per forward pass (all layers move in lockstep).

Keys are stored after RoPE, so a cached key never needs its position again.
"""

from __future__ import annotations

import mlx.core as mx

from .masks import Mask, windowed_mask


class _Cache:
    """What both caches share: the buffers, the position count, and the protocol basics."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def is_trimmable(self) -> bool:
        return True

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class KVCache(_Cache):
    """Full-attention cache; grows in steps of `step` positions."""

    def make_mask(self, num_queries: int, window: int | None = None) -> Mask:
        return windowed_mask(self.offset, num_queries, 0, self.offset + num_queries, window)

    def key_positions(self, num_queries: int) -> mx.array:
        """Positions of the keys the next `update_and_fetch` of that many queries returns."""
        return mx.arange(self.offset + num_queries)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        end = self.offset + length
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., self.offset:end, :] = keys
        self.values[..., self.offset:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((*keys.shape[:2], capacity, keys.shape[3]), keys.dtype)
        new_v = mx.zeros((*values.shape[:2], capacity, values.shape[3]), values.dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> tuple[mx.array, mx.array] | list:
        if self.keys is None:
            return []
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, value: tuple[str, ...]) -> None:
        self.offset = int(value[0])

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


class RotatingKVCache(_Cache):
    """Sliding-window cache holding at most `window` positions per layer.

    Position p lives in slot p % window. Decoding writes one slot and attends to the buffer as
    is (attention does not care about key order). A multi-token chunk attends to the previous
    window-1 positions, gathered in order, plus itself; only its last `window` positions are
    stored, so memory stays at the window also during a chunked prefill of a long prompt.

    Trimming after the buffer has wrapped cannot bring back positions that were overwritten:
    the cache then holds fewer than `window` past positions, masks the trimmed slots out, and
    `complete` turns False until decoding has moved a full window past the lost positions.
    """

    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        super().__init__()
        self.window = window
        self.start = 0  # oldest position whose key is still valid (moves up only via trim)

    # ---- masks -------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether every key the next query may see (its whole window) is held."""
        return self.start <= max(0, self.offset + 1 - self.window)

    def _first_visible(self, position: int) -> int:
        return max(self.start, position - self.window + 1)

    def make_mask(self, num_queries: int, window: int | None = None) -> Mask:
        if num_queries > 1:
            lo = self._first_visible(self.offset)
            return windowed_mask(self.offset, num_queries, lo,
                                 self.offset + num_queries - lo, self.window)
        if self.complete:
            return None  # every returned slot is within the window and valid
        # Decoding after a trim of a wrapped buffer: hide slots holding trimmed positions.
        return (self.key_positions(1) >= self.start)[None]

    def key_positions(self, num_queries: int) -> mx.array:
        """Positions of the keys the next `update_and_fetch` of that many queries returns
        (for one query: the ring's slots, each holding the latest position that maps to it)."""
        if num_queries > 1:
            return mx.arange(self._first_visible(self.offset), self.offset + num_queries)
        slot = mx.arange(min(self.offset + 1, self.window))
        return self.offset - (self.offset - slot) % self.window

    # ---- update -------------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._update_one(keys, values)
        return self._update_many(keys, values)

    def _update_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        slot = self.offset % self.window
        self._reserve(slot + 1, keys, values)
        self.keys[..., slot:slot + 1, :] = keys
        self.values[..., slot:slot + 1, :] = values
        self.offset += 1
        used = min(self.offset, self.window)
        return self.keys[..., :used, :], self.values[..., :used, :]

    def _update_many(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        lo = self._first_visible(self.offset)
        past_k, past_v = self._ordered(lo, self.offset)
        out_k = keys if past_k is None else mx.concatenate([past_k, keys], axis=2)
        out_v = values if past_v is None else mx.concatenate([past_v, values], axis=2)

        kept = min(length, self.window)
        first = self.offset + length - kept  # position of the first stored new key
        self._reserve(min(first + kept, self.window), keys, values)
        self._write(first, keys[..., length - kept:, :], values[..., length - kept:, :])
        self.offset += length
        return out_k, out_v

    def _reserve(self, size: int, keys: mx.array, values: mx.array) -> None:
        """Make the buffer hold at least `size` slots (never more than the window)."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if size <= have:
            return
        capacity = min(self.window, ((size + self.step - 1) // self.step) * self.step)
        new_k = mx.zeros((*keys.shape[:2], capacity, keys.shape[3]), keys.dtype)
        new_v = mx.zeros((*values.shape[:2], capacity, values.shape[3]), values.dtype)
        if have:
            new_k[..., :have, :] = self.keys
            new_v[..., :have, :] = self.values
        self.keys, self.values = new_k, new_v

    def _write(self, first: int, keys: mx.array, values: mx.array) -> None:
        """Store consecutive positions first.. into their slots (wrapping at most once)."""
        count = keys.shape[2]
        s0 = first % self.window
        head = min(count, self.window - s0)
        self.keys[..., s0:s0 + head, :] = keys[..., :head, :]
        self.values[..., s0:s0 + head, :] = values[..., :head, :]
        if head < count:
            self.keys[..., : count - head, :] = keys[..., head:, :]
            self.values[..., : count - head, :] = values[..., head:, :]

    def _ordered(self, lo: int, hi: int) -> tuple[mx.array | None, mx.array | None]:
        """Keys and values of positions lo..hi-1 in order (hi - lo <= window)."""
        if hi <= lo:
            return None, None
        s0, s1 = lo % self.window, (hi - 1) % self.window + 1
        if s0 < s1:
            return self.keys[..., s0:s1, :], self.values[..., s0:s1, :]
        k = mx.concatenate([self.keys[..., s0:, :], self.keys[..., :s1, :]], axis=2)
        v = mx.concatenate([self.values[..., s0:, :], self.values[..., :s1, :]], axis=2)
        return k, v

    # ---- protocol -----------------------------------------------------------------------------

    @property
    def state(self) -> tuple[mx.array, mx.array] | list:
        if self.keys is None:
            return []
        used = min(self.offset, self.keys.shape[2])
        return self.keys[..., :used, :], self.values[..., :used, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = value

    @property
    def meta_state(self) -> tuple[str, ...]:
        return tuple(map(str, (self.window, self.offset, self.start)))

    @meta_state.setter
    def meta_state(self, value: tuple[str, ...]) -> None:
        self.window, self.offset, self.start = map(int, value)

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        new_offset = self.offset - n
        # Slots of positions >= new_offset now hold stale keys; positions that were
        # overwritten by them are gone for good.
        self.start = min(max(self.start, self.offset - self.window), new_offset)
        self.offset = new_offset
        return n
