"""Streaming a GGUF Mixtral's experts: each expert read by byte range and laid into its slot.

A GGUF stores a layer's experts stacked (`blk.L.ffn_gate_exps.weight`, [experts, out, in]) or
one tensor each (`blk.L.ffn_gate.E.weight`, older files): either way one expert's gate, up or
down projection is one contiguous range of blocks. `GGUFExperts` (model/expert_cache.py's
`ExpertLoader`) reads each range, a few MB at a time, into a per-thread staging buffer and
converts its blocks straight into the slot's arrays (gguf_quants.py: packed words, scales and
biases in the slots' dtypes), which is what `mx.load` makes of the whole tensor in the resident
model; so the paged model computes exactly what the resident one does.

Q4_0, Q4_1 and Q8_0 experts stream; other types (K-quants, I-quants ...) are refused in one line
that suggests converting the file to an MLX folder, whose experts stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MemoryLimitError, WeightsError
from .expert_files import STAGE_BYTES, BusyClock, _read_into, _slot_views
from .gguf_quants import GROUP, NATIVE_BITS, block_bytes, flat_view, packed_bytes, to_affine
from .gguf_weights import EXPERT_TENSOR

if TYPE_CHECKING:
    from .source import ModelSource

STREAMED_TYPES = tuple(NATIVE_BITS)
# A projection is read and converted this many bytes at a time: one expert's projection of a
# real Mixtral is 33 MB in Q4_0, which a staging buffer per reading thread would add to the
# process's memory. Half a staging buffer (expert_files.STAGE_BYTES, which the memory plan
# counts per thread), as the conversion's scratch takes about as much again (gguf_quants).
READ_BYTES = STAGE_BYTES // 2


@dataclass(frozen=True)
class GGUFExtent:
    """One projection of one expert: its blocks' byte range and type."""

    offset: int
    nbytes: int
    kind: str  # "Q4_0", "Q4_1" or "Q8_0"
    proj: str  # "gate", "up" or "down"


def expert_types(source: ModelSource) -> set[str]:
    """The types of a GGUF's expert tensors ("Q4_0", "Q4_K" ...)."""
    return {t.dtype for t in source.tensors if EXPERT_TENSOR.match(t.name)}


def streamable(source: ModelSource) -> bool:
    """Whether a GGUF Mixtral's experts can be streamed (all of a type we convert)."""
    kinds = expert_types(source)
    return bool(kinds) and kinds <= set(STREAMED_TYPES)


def not_streamable(source: ModelSource, budget: str) -> MemoryLimitError:
    """The one-line refusal of a GGUF whose experts are of a type that does not stream."""
    odd = ", ".join(sorted(expert_types(source) - set(STREAMED_TYPES)))
    return MemoryLimitError(
        f"{source.path.name}: its experts are {odd}, which does not stream (GGUF experts "
        f"stream as {', '.join(STREAMED_TYPES)}), so it does not run within max_memory="
        f"{budget}; convert it to an MLX folder (mlx-mixtral convert --hf-path "
        f"{source.path} --mlx-path FOLDER -q) and give the folder, or raise the budget",
        params=("max_memory",))


def gguf_expert_extents(source: ModelSource, layers: int, experts: int
                        ) -> list[list[list[GGUFExtent]]]:
    """[layer][expert] -> the byte ranges of that expert, from the file's description."""
    path = source.path
    table: list[list[list[GGUFExtent]]] = [[[] for _ in range(experts)] for _ in range(layers)]
    for t in source.tensors:
        m = EXPERT_TENSOR.match(t.name)
        if m is None:
            continue
        layer, proj, one = int(m.group(1)), m.group(2), m.group(3)
        if layer >= layers or (one is not None and int(one) >= experts):
            raise WeightsError(f"{path}: {t.name} is beyond the model's {layers} layers of "
                               f"{experts} experts")
        if t.dtype not in NATIVE_BITS:
            raise WeightsError(f"{path}: {t.name} is {t.dtype}, which expert streaming does "
                               "not read")
        if one is not None:  # one tensor per expert
            table[layer][int(one)].append(GGUFExtent(t.offset, t.nbytes, t.dtype, proj))
            continue
        if t.nbytes % experts:
            raise WeightsError(f"{path}: {t.name} does not hold {experts} experts")
        row = t.nbytes // experts  # expert e is the e-th of equal ranges
        for e in range(experts):
            table[layer][e].append(GGUFExtent(t.offset + e * row, row, t.dtype, proj))
    return table


class GGUFExperts:
    """Reads a GGUF's Q4_0/Q4_1/Q8_0 experts into the slots of paged layers (an
    `ExpertLoader`); `load` may run on several threads at once (each has its own file handle
    and staging buffer)."""

    def __init__(self, source: ModelSource, switch_mlps: list, num_experts: int,
                 inter: int) -> None:
        self.path = source.path
        self.extents = gguf_expert_extents(source, len(switch_mlps), num_experts)
        self.views = [_slot_views(m, inter) for m in switch_mlps]
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()
        self.cold = False  # drop every range read from the page cache (bench's cold runs)
        self.clock = BusyClock()
        self._check()

    def set_cold(self, on: bool) -> None:
        """Cold reads (the benchmark's): every range read is dropped from the page cache, and
        the handles read nothing ahead (page_cache.bypass_cache)."""
        from .page_cache import bypass_cache

        with self._lock:
            self.cold = on
            for f in self._opened:
                bypass_cache(f.fileno(), on)

    def set_coalesce(self, on: bool) -> None:
        """(Each projection of an expert is already one range: nothing to merge.)"""

    def _check(self) -> None:
        """Every expert has its three projections, each as large as its slot."""
        for layer, experts in enumerate(self.extents):
            for e, extents in enumerate(experts):
                if sorted(x.proj for x in extents) != ["down", "gate", "up"]:
                    raise WeightsError(f"{self.path}: layer {layer}, expert {e} lacks or "
                                       "repeats a projection")
                for x in extents:
                    weight, _, rows = self.views[layer][f"{x.proj}.weight"]
                    scales, _, _ = self.views[layer][f"{x.proj}.scales"]
                    blocks = x.nbytes // block_bytes(x.kind)
                    if (scales[0, rows].size != blocks
                            or weight[0, rows].nbytes != blocks * packed_bytes(x.kind)):
                        raise WeightsError(f"{self.path}: layer {layer}, expert {e}: "
                                           f"{x.proj} has {blocks * GROUP} weights, which "
                                           "does not match the config")

    def _file(self):
        f = getattr(self._local, "file", None)
        if f is None:
            from .page_cache import bypass_cache

            f = self._local.file = open(self.path, "rb", buffering=0)  # noqa: SIM115
            with self._lock:
                self._opened.append(f)
                bypass_cache(f.fileno(), self.cold)
        return f

    def _staging(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.staging = np.empty(nbytes, np.uint8)  # at most READ_BYTES
        return buf[:nbytes]

    def pieces(self, layer: int, expert: int, slot: int, parts: int = 1
               ) -> list[Callable[[], int]]:
        """One expert's reads as callables for the reader pool: one per projection."""
        return [lambda x=x: self._load_range(layer, x, slot)
                for x in self.extents[layer][expert]]

    def load(self, layer: int, expert: int, slot: int) -> int:
        return sum(piece() for piece in self.pieces(layer, expert, slot))

    def _load_range(self, layer: int, x, slot: int) -> int:
        """One projection of one expert, read and converted a piece at a time."""
        f, views = self._file(), self.views[layer]
        weight, _, rows = views[f"{x.proj}.weight"]
        packed = flat_view(weight[slot, rows].view(np.uint8), (-1,))
        scales = flat_view(views[f"{x.proj}.scales"][0][slot, rows], (-1,))
        biases = flat_view(views[f"{x.proj}.biases"][0][slot, rows], (-1,))
        size, out = block_bytes(x.kind), packed_bytes(x.kind)
        step, blocks = max(READ_BYTES // size, 1), x.nbytes // size
        with self.clock:
            for start in range(0, blocks, step):
                end = min(start + step, blocks)
                raw = self._staging((end - start) * size)
                _read_into(f, x.offset + start * size, memoryview(raw))
                to_affine(raw, x.kind, packed[start * out:end * out], scales[start:end],
                          biases[start:end])
            if self.cold:
                from .page_cache import drop_range

                drop_range(f.fileno(), x.offset, x.nbytes)
        return x.nbytes

    def close(self) -> None:
        with self._lock:
            for f in self._opened:
                f.close()
            self._opened.clear()
