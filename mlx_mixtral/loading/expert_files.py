"""Where each expert's weights lie in the safetensors files, and reading them into a slot.

A slot is a row of the paged layer's arrays (see model/expert_cache.py). One expert of
one layer is a few byte ranges: in an MLX folder, row `e` of each stacked
`switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` tensor; in a Hugging Face folder, the
whole `experts.E.w1/w2/w3.weight` tensors. Each range is read with `readinto` straight into the
slot's memory (a writable NumPy view of the MLX array), so a miss allocates nothing. A range
stored in another float dtype than the slot's (bfloat16 or float16 scales read into float32
ones, as the CPU backend wants them) goes through a small per-thread staging buffer. A
tensor-parallel rank's slots hold its slice of each tensor: an extent is then `count` ranges
`stride` bytes apart (one per row before the cut axis; loading/rank_loader.py).
"""

from __future__ import annotations

import re
import threading
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


class ExpertFiles:
    """Reads experts of an MLX or Hugging Face folder into the slots of paged layers
    (model/expert_cache.py's `ExpertLoader`)."""

    def __init__(self, files: list[Path], switch_mlps: list, num_experts: int,
                 inter: int, extents: list[list[list[Extent]]] | None = None) -> None:
        """`extents`: where each slot's bytes lie, when not every layer's whole experts
        (a rank's share: loading/rank_loader.py)."""
        self.paths = list(files)
        self.extents = extents or expert_extents(self.paths, len(switch_mlps), num_experts)
        self.views = [_slot_views(m, inter) for m in switch_mlps]
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()
        self._check()

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

    def _files(self) -> list:
        files = getattr(self._local, "files", None)
        if files is None:
            files = [open(p, "rb", buffering=0) for p in self.paths]  # noqa: SIM115
            self._local.files = files
            with self._lock:
                self._opened.extend(files)
        return files

    def _staging(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, np.uint8)  # grows once to the largest converted range
            self._local.staging = buf
        return buf[:nbytes]

    def load(self, layer: int, expert: int, slot: int) -> int:
        files = self._files()
        total = 0
        for x in self.extents[layer][expert]:
            view, kind, rows = self.views[layer][x.dest]
            dest = view[slot, rows]
            same = x.stored == kind
            target = dest if same else self._staging(x.total)
            raw = memoryview(target).cast("B")
            for i in range(x.count):
                _read_into(files[x.file], x.offset + i * x.stride,
                           raw[i * x.nbytes:(i + 1) * x.nbytes])
            if not same:
                _convert(target, x.stored, dest)
            total += x.total
        return total

    def close(self) -> None:
        with self._lock:
            for f in self._opened:
                f.close()
            self._opened.clear()


def _itemsize(stored: str) -> int:
    return np.dtype(_NUMPY.get(stored, np.uint8)).itemsize


def _convertible(stored: str, kind: str) -> bool:
    return stored == kind or (stored in ("BF16", "F16") and kind == "F32")


def _read_into(f, offset: int, buf: memoryview) -> None:
    f.seek(offset)
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise WeightsError(f"{f.name}: the file ended early (truncated?)")
        done += n


def _convert(raw: np.ndarray, stored: str, dest: np.ndarray) -> None:
    """Half-precision bytes in `raw` into the float32 `dest`, without a temporary array."""
    if stored == "F16":
        np.copyto(dest, raw.view(np.float16).reshape(dest.shape))
        return
    bits = dest.view(np.uint32)  # bfloat16 is the top half of a float32
    np.copyto(bits, raw.view(np.uint16).reshape(dest.shape))
    np.left_shift(bits, 16, out=bits)
