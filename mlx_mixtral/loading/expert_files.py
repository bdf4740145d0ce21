"""Where each expert's weights lie in the safetensors files, and reading them into a slot.

A slot is a row of the paged layer's arrays (see model/expert_cache.py). One expert of
one layer is a few byte ranges: in an MLX folder, row `e` of each stacked
`switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` tensor; in a Hugging Face folder, the
whole `experts.E.w1/w2/w3.weight` tensors. Each range is read with `readinto` straight into the
slot's memory (a writable NumPy view of the MLX array), so a miss allocates nothing. A range
stored in another float dtype than the slot's (bfloat16 or float16 scales read into float32
ones, as the CPU backend wants them) goes through a small per-thread staging buffer, in
pieces of at most STAGE_BYTES, so that buffer stays small whatever the tensor.

Ranges of one expert that lie end to end in one file (an expert written contiguously, as the
streaming layout and Hugging Face's per-expert tensors do) are coalesced: one `preadv` scatters
them into their slot arrays. An expert's reads can be cut into `pieces` that several reader
threads run at once (the pager's reader pool), since flash wants large reads, several in flight.

A tensor-parallel rank's slots hold its slice of each tensor: an extent is then `count` ranges
`stride` bytes apart (one per row before the cut axis; loading/rank_loader.py), read one by one.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import WeightsError
from .safetensors_file import check_safetensors

EXPERT_TENSOR = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.(?:switch_mlp\.(gate|up|down)_proj|"
    r"experts\.(\d+)\.(w[123]))\.(weight|scales|biases)$")
_HF_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}
# safetensors dtype -> the NumPy dtype holding its bits (bfloat16 as raw 16-bit words)
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32,
          "U8": np.uint8, "I8": np.int8}
_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
          mx.uint8: "U8", mx.int8: "I8"}


# A converted range is read in pieces of at most this: each reader thread's staging buffer.
STAGE_BYTES = 1 << 18
# Pieces of one expert read by several threads are no smaller than this (flash reads fast
# only in large requests).
MIN_PIECE = 1 << 20


def is_expert_tensor(name: str) -> bool:
    return EXPERT_TENSOR.match(name) is not None


@dataclass(frozen=True)
class Extent:
    """One byte range of one expert, and where in its slot it goes."""

    file: int  # index into ExpertFiles.paths
    offset: int
    nbytes: int
    stored: str  # safetensors dtype
    dest: str  # "gate.weight", "down.scales" ...
    shape: tuple[int, ...] = ()  # the expert's whole tensor
    count: int = 1  # a tensor-parallel rank's part: `count` ranges of `nbytes`, `stride` apart
    stride: int = 0

    @property
    def total(self) -> int:
        return self.nbytes * self.count


@dataclass(frozen=True)
class Run:
    """Extents of one expert lying end to end in one file (one read), or one converted extent
    (`staged`: read through the staging buffer)."""

    file: int
    offset: int
    extents: tuple[Extent, ...]
    staged: bool

    @property
    def nbytes(self) -> int:
        return sum(x.total for x in self.extents)


def runs_of(extents: list[Extent], staged: set[str], coalesce: bool) -> list[Run]:
    """An expert's extents as reads: adjacent ones merged (`coalesce`), in file order. A
    converted extent (its dest in `staged`) or a strided one (a rank's part) is a run of its
    own."""
    runs: list[Run] = []
    for x in sorted(extents, key=lambda x: (x.file, x.offset)):
        last = runs[-1] if runs else None
        conv = x.dest in staged
        if (coalesce and last is not None and not conv and not last.staged and x.count == 1
                and last.extents[-1].count == 1
                and last.file == x.file and last.offset + last.nbytes == x.offset):
            runs[-1] = Run(last.file, last.offset, (*last.extents, x), False)
        else:
            runs.append(Run(x.file, x.offset, (x,), conv))
    return runs


def _cuts(run: Run, parts: int) -> list[tuple[int, int]]:
    """[start, end) byte spans of `run` for up to `parts` readers (staged runs: pieces of at
    most STAGE_BYTES, cut on 4-byte boundaries so that no element is split)."""
    n = run.nbytes
    if run.extents[0].count > 1:  # a rank's strided part: one piece, a read per range
        return [(0, n)]
    step = max(-(-n // parts), MIN_PIECE) if parts > 1 else n
    if run.staged:
        step = min(step, STAGE_BYTES)
    step = max(-(-step // 4) * 4, 4)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def tensor_index(files: list[Path], keep=is_expert_tensor
                  ) -> dict[str, tuple[int, int, int, str, list[int]]]:
    """The tensors `keep` keeps (the experts', unless told): (file index, absolute data
    offset, bytes, dtype, shape)."""
    out = {}
    for i, path in enumerate(files):
        header = check_safetensors(path)
        with path.open("rb") as f:
            base = 8 + int.from_bytes(f.read(8), "little")
        for name, info in header.items():
            if name != "__metadata__" and keep(name):
                start, end = info["data_offsets"]
                out[name] = (i, base + start, end - start, info["dtype"], info["shape"])
    return out


def expert_extents(files: list[Path], layers: int, experts: int
                   ) -> list[list[list[Extent]]]:
    """[layer][expert] -> the byte ranges of that expert."""
    table: list[list[list[Extent]]] = [[[] for _ in range(experts)] for _ in range(layers)]
    for name, (file, offset, nbytes, dtype, shape) in tensor_index(files).items():
        m = EXPERT_TENSOR.match(name)
        layer, proj, hf_expert, hf_name, param = m.groups()
        layer = int(layer)
        if layer >= layers:
            raise WeightsError(f"{files[file]}: {name} is beyond the config's {layers} layers")
        if proj is not None:  # stacked [experts, ...]: expert e is the e-th equal row
            if not shape or shape[0] != experts or nbytes % experts:
                raise WeightsError(f"{files[file]}: {name} does not hold {experts} experts")
            row = nbytes // experts
            for e in range(experts):
                table[layer][e].append(Extent(file, offset + e * row, row, dtype,
                                              f"{proj}.{param}", tuple(shape[1:])))
        else:
            e = int(hf_expert)
            if e >= experts:
                raise WeightsError(f"{files[file]}: {name} is beyond the config's {experts} "
                                   "experts")
            table[layer][e].append(Extent(file, offset, nbytes, dtype,
                                          f"{_HF_PROJ[hf_name]}.{param}", tuple(shape)))
    return table


def writable_view(value: mx.array) -> tuple[np.ndarray, str]:
    """A NumPy array sharing `value`'s memory (evaluated), and its safetensors dtype name."""
    mx.eval(value)
    name = _NAMES[value.dtype]
    raw = memoryview(value).cast("B")
    return np.frombuffer(raw, dtype=_NUMPY[name]).reshape(value.shape), name


def _slot_views(switch_mlp, inter: int) -> dict[str, tuple[np.ndarray, slice, str]]:
    """"gate.weight" ... -> (writable NumPy view of the slot array, its rows for that part,
    its dtype): gate and up share the fused `gate_up_proj` (gate rows first)."""
    views = {}
    fused = "gate_up_proj" in switch_mlp
    for proj in ("gate", "up", "down"):
        module = switch_mlp["gate_up_proj" if fused and proj != "down" else f"{proj}_proj"]
        rows = slice(None)
        if fused and proj != "down":
            rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
        for param, value in module.items():
            if isinstance(value, mx.array):
                views[f"{proj}.{param}"] = (*writable_view(value), rows)
    return views


class BusyClock:
    """Wall time during which at least one read ran: bytes over it are the read speed, however
    many threads read at once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._active = 0
        self._since = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            if not self._active:
                self._since = time.perf_counter()
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if not self._active:
                self.seconds += time.perf_counter() - self._since


class ExpertFiles:
    """Reads experts of an MLX or Hugging Face folder into the slots of paged layers
    (model/expert_cache.py's `ExpertLoader`). `coalesce=False` reads every range on its own
    (the reads before coalescing, kept for the benchmark's baseline)."""

    def __init__(self, files: list[Path], switch_mlps: list, num_experts: int,
                 inter: int, coalesce: bool = True,
                 extents: list[list[list[Extent]]] | None = None) -> None:
        """`extents`: where each slot's bytes lie, when not every layer's whole experts
        (a rank's share: loading/rank_loader.py)."""
        self.paths = list(files)
        self.extents = extents or expert_extents(self.paths, len(switch_mlps), num_experts)
        self.views = [_slot_views(m, inter) for m in switch_mlps]
        self.cold = False  # drop every range read from the page cache (see set_cold)
        self.read_calls = 0  # read system calls, for the tests
        self.clock = BusyClock()
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()
        self._check()
        self.set_coalesce(coalesce)

    def set_coalesce(self, on: bool) -> None:
        """Merge adjacent ranges into one read (on), or read each range alone."""
        self.coalesce = on
        self.runs = [[runs_of(ext, self._staged(layer, ext), on) for ext in experts]
                     for layer, experts in enumerate(self.extents)]

    def _staged(self, layer: int, extents: list[Extent]) -> set[str]:
        return {x.dest for x in extents if x.stored != self.views[layer][x.dest][1]}

    def _check(self) -> None:
        for layer, experts in enumerate(self.extents):
            for e, extents in enumerate(experts):
                got = {x.dest for x in extents}
                if got != set(self.views[layer]):
                    missing = sorted(set(self.views[layer]) - got) or sorted(got)
                    raise WeightsError(f"layer {layer}, expert {e}: the files lack or add "
                                       f"{', '.join(missing)}")
                for x in extents:
                    view, kind, rows = self.views[layer][x.dest]
                    dest = view[0, rows]
                    if x.stored not in _NUMPY or not _convertible(x.stored, kind):
                        raise WeightsError(f"{x.dest} is stored as {x.stored}, which expert "
                                           f"paging cannot read into {kind}; convert the "
                                           "model with mlx-mixtral convert -q first")
                    if dest.size * _itemsize(x.stored) != x.total:
                        raise WeightsError(f"layer {layer}, expert {e}: {x.dest} has "
                                           f"{x.total} bytes in the file, which does not "
                                           "match the config")

    def set_cold(self, on: bool) -> None:
        """Cold reads (the benchmark's): every range read is dropped from the page cache, as
        on a Mac whose memory cannot hold the model (macOS: the handles bypass the cache)."""
        from .page_cache import bypass_cache

        with self._lock:
            self.cold = on
            for f in self._opened:
                bypass_cache(f.fileno(), on)

    def _files(self) -> list:
        files = getattr(self._local, "files", None)
        if files is None:
            from .page_cache import bypass_cache

            files = [open(p, "rb", buffering=0) for p in self.paths]  # noqa: SIM115
            self._local.files = files
            with self._lock:
                self._opened.extend(files)
                for f in files:
                    bypass_cache(f.fileno(), self.cold)
        return files

    def _staging(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(STAGE_BYTES, nbytes), np.uint8)  # pieces staged are at most this
            self._local.staging = buf
        return buf[:nbytes]

    def pieces(self, layer: int, expert: int, slot: int, parts: int = 1
               ) -> list[Callable[[], int]]:
        """One expert's reads into slot `slot`, cut for up to `parts` threads to run at once;
        each returns the bytes it read."""
        return [lambda run=run, a=a, b=b: self._read_span(layer, slot, run, a, b)
                for run in self.runs[layer][expert] for a, b in _cuts(run, parts)]

    def load(self, layer: int, expert: int, slot: int) -> int:
        return sum(piece() for piece in self.pieces(layer, expert, slot))

    def _read_span(self, layer: int, slot: int, run: Run, a: int, b: int) -> int:
        """Bytes [a, b) of `run` into slot `slot`."""
        f = self._files()[run.file]
        views = self.views[layer]
        with self.clock:
            if run.extents[0].count > 1:
                self._read_strided(f, run.extents[0], views, slot)
            elif run.staged:
                (x,) = run.extents
                view, _, rows = views[x.dest]
                raw = self._staging(b - a)
                self._pread(f, [memoryview(raw)], run.offset + a)
                size = _itemsize(x.stored)
                _convert(raw, x.stored, view[slot, rows].reshape(-1)[a // size:b // size])
            else:
                bufs, at = [], 0
                for x in run.extents:
                    lo, hi = max(a - at, 0), min(b - at, x.nbytes)
                    if lo < hi:
                        view, _, rows = views[x.dest]
                        bufs.append(memoryview(view[slot, rows]).cast("B")[lo:hi])
                    at += x.nbytes
                self._pread(f, bufs, run.offset + a)
            if self.cold:
                from .page_cache import drop_range

                drop_range(f.fileno(), run.offset + a, b - a)
        return b - a

    def _read_strided(self, f, x: Extent, views: dict, slot: int) -> None:
        """A rank's part of a tensor: `count` ranges, one after another into the slot."""
        view, kind, rows = views[x.dest]
        dest = view[slot, rows].reshape(-1)
        size = _itemsize(x.stored)
        per = x.nbytes // size  # elements per range
        for i in range(x.count):
            at = x.offset + i * x.stride
            if x.stored == kind:
                self._pread(f, [memoryview(dest[i * per:(i + 1) * per]).cast("B")], at)
            else:
                raw = self._staging(x.nbytes)
                self._pread(f, [memoryview(raw)], at)
                _convert(raw, x.stored, dest[i * per:(i + 1) * per])

    def _pread(self, f, bufs: list[memoryview], offset: int) -> None:
        """Fill `bufs` from `offset` on: one scattering read (more only if it comes short)."""
        with self._lock:
            self.read_calls += 1
        while bufs:
            n = os.preadv(f.fileno(), bufs, offset) if _PREADV else _read_each(f, bufs, offset)
            if n <= 0:
                raise WeightsError(f"{f.name}: the file ended early (truncated?)")
            offset += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            if bufs and n:
                bufs[0] = bufs[0][n:]

    def close(self) -> None:
        with self._lock:
            for f in self._opened:
                f.close()
            self._opened.clear()


# preadv: Linux, and macOS from 11 (Python may be built without it).
_PREADV = hasattr(os, "preadv") and sys.platform != "win32"


def _read_into(f, offset: int, buf: memoryview) -> None:
    """Fill `buf` from `offset` of the open file `f`."""
    done = 0
    while done < len(buf):
        n = os.preadv(f.fileno(), [buf[done:]], offset + done) if _PREADV else \
            _read_each(f, [buf[done:]], offset + done)
        if n <= 0:
            raise WeightsError(f"{f.name}: the file ended early (truncated?)")
        done += n


def _read_each(f, bufs: list[memoryview], offset: int) -> int:
    """preadv's fallback: the buffers one after another; the bytes read."""
    done = 0
    f.seek(offset)
    for buf in bufs:
        n = f.readinto(buf) or 0
        done += n
        if n < len(buf):
            break
    return done


def _itemsize(stored: str) -> int:
    return np.dtype(_NUMPY.get(stored, np.uint8)).itemsize


def _convertible(stored: str, kind: str) -> bool:
    return stored == kind or (stored in ("BF16", "F16") and kind == "F32")


def _convert(raw: np.ndarray, stored: str, dest: np.ndarray) -> None:
    """Half-precision bytes in `raw` into the float32 `dest`, without a temporary array."""
    if stored == "F16":
        np.copyto(dest, raw.view(np.float16).reshape(dest.shape))
        return
    bits = dest.view(np.uint32)  # bfloat16 is the top half of a float32
    np.copyto(bits, raw.view(np.uint16).reshape(dest.shape))
    np.left_shift(bits, 16, out=bits)
