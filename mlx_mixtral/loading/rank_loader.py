"""A model split over the ranks of an `mx.distributed` group, each rank reading only its share.

- **Tensor parallel**: the rank's model is built unloaded (`model_skeleton`) and split by
  model/sharding.py's `shard_tensors`; the shapes it then has say which part of every stored
  tensor this rank holds (the one place that knows the split stays sharding.py), and exactly
  those bytes are read, straight into arrays of the rank's shapes (rank_slices.py). No rank
  reads, or holds for a moment, a whole tensor that it splits.
- **Pipeline**: the lazy, memory-mapped model is cut to the rank's layers before anything is
  read; MLX reads only the tensors left.

Within a budget (`--max-memory` under mlx.launch) each rank pages its own share of the experts,
as one process does (expert_paging.py): a tensor-parallel rank's slots hold its slices of the
experts, read by byte range; a pipeline rank pages only its layers. `plan_ranks` plans every
rank's share of the budget the same way on every rank, and all ranks take the shortest prefill
chunk and context of those plans: what changes the output is the same everywhere, and the ranks'
slots differ only in when they were read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MemoryLimitError, WeightsError
from ..model.config import ModelArgs
from ..model.decoder import Model
from ..model.expert_cache import DEFAULT_READ_THREADS, ExpertPager, PagedMoE
from ..model.precision import cast_weights, loaded_dtype, target_dtype
from ..model.sharding import layer_range, shard_layers, shard_tensors
from .checkpoint import (
    check_shapes,
    hf_expert,
    layer_index,
    load_checked,
    model_skeleton,
    sanitize,
    tensor_name,
)
from .expert_files import (
    ExpertFiles,
    Extent,
    _itemsize,
    _slot_views,
    expert_extents,
    is_expert_tensor,
    tensor_index,
    writable_view,
)
from .expert_paging import _empty_slots, _slot_float_dtype
from .memory_plan import MemoryPlan, plan_memory
from .rank_slices import Part, part_of, read_part
from .safetensors_file import read_safetensors
from .source import ModelSource

_STORED = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32,
           "U8": mx.uint8, "I8": mx.int8}


class RankOf:
    """Rank `rank` of `size`, for splitting a model that is never run (planning, tests):
    what `shard_tensors` asks of a group."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@dataclass(frozen=True)
class RankShare:
    """What one rank holds, for planning its memory: each stored tensor's share, and the
    shape of its part of the model (its layers, or its heads and expert width)."""

    fractions: dict[str, float]  # stored tensor name -> the share of it held
    args: ModelArgs


def _stored_names(source: ModelSource) -> set[str]:
    return {tensor_name(t.name) for t in source.tensors}


def _shapes(model: Model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def rank_share(source: ModelSource, size: int, rank: int, pipeline: bool) -> RankShare:
    """Rank `rank` of `size`'s share of the model (the world was checked: check_world)."""
    args = source.args
    if pipeline:
        held = layer_range(args.num_hidden_layers, size, rank)
        fractions = {t.name: float(layer_index(t.name) in held or layer_index(t.name) is None)
                     for t in source.tensors}
        return RankShare(fractions, replace(args, num_hidden_layers=len(held)))
    model = model_skeleton(args, source.quantization, _stored_names(source))
    whole = _shapes(model)
    shard_tensors(model, RankOf(size, rank))
    part = _shapes(model)
    fractions = {}
    for t in source.tensors:
        name = tensor_name(t.name)
        held = part.get(name)
        fractions[t.name] = math.prod(held) / math.prod(whole[name]) if held else 1.0
    return RankShare(fractions, replace(
        args, num_attention_heads=args.num_attention_heads // size,
        num_key_value_heads=args.num_key_value_heads // size,
        intermediate_size=args.intermediate_size // size))


def plan_ranks(source: ModelSource, budget: int, size: int, rank: int, pipeline: bool,
               dtype: str | mx.Dtype | None = None, context: int | None = None,
               reserve: int = 0, shrink: bool = False) -> MemoryPlan:
    """This rank's plan within `budget` (every rank has the same budget: the same flag). Every
    rank plans every rank's share, so all refuse a budget one of them cannot run in, with the
    same line, and all take the shortest prefill chunk and context of the plans."""
    # Tensor-parallel ranks hold equal shares: one plan stands for all.
    ranks = range(size) if pipeline else (rank,)
    try:
        plans = {r: plan_memory(source, budget, dtype, context, reserve, shrink,
                                share=rank_share(source, size, r, pipeline)) for r in ranks}
    except MemoryLimitError as e:  # the same line on every rank
        raise MemoryLimitError(f"{e} (each rank's budget, for its share of the model)",
                               params=e.params) from None
    return replace(plans[rank], prefill_step=min(p.prefill_step for p in plans.values()),
                   context_limit=min(p.context_limit for p in plans.values()))


def _read_tensor(fd: int, part: Part, shape: tuple[int, ...], stored: str) -> mx.array:
    """A new array of `shape` filled from `part` of the file."""
    out = mx.zeros(shape, _STORED[stored])
    view, _ = writable_view(out)
    read_part(fd, part, memoryview(view.reshape(-1)).cast("B"))
    return out


class SliceReader:
    """Reads a rank's part of each stored tensor; counts the bytes it read."""

    def __init__(self, files: list) -> None:
        self.index = tensor_index(files, keep=lambda name: True)
        self.fds = [os.open(p, os.O_RDONLY) for p in files]
        self.bytes_read = 0

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def read(self, stored: list[str], held: tuple[int, ...], rank: int) -> mx.array:
        """Our tensor of shape `held`, from the stored tensor (or, stacked, the per-expert
        tensors) named `stored`."""
        if len(stored) == 1 and hf_expert(stored[0]) is None:
            return self._one(stored[0], held, rank)
        rows = [self._one(name, held[1:], rank) for name in stored]  # experts, in order
        return mx.stack(rows)

    def _one(self, name: str, held: tuple[int, ...], rank: int) -> mx.array:
        file, offset, nbytes, dtype, shape = self.index[name]
        if dtype not in _STORED:
            raise WeightsError(f"{name} is stored as {dtype}, which a tensor-parallel rank "
                               "cannot read; convert the model with mlx-mixtral convert")
        try:
            part = part_of(tuple(shape), _STORED[dtype].size, held, rank, offset)
        except ValueError:
            raise WeightsError(f"{name} has the shape {tuple(shape)}, which the split does not "
                               "fit; the config and weights do not belong together") from None
        self.bytes_read += part.total
        return _read_tensor(self.fds[file], part, held, dtype)


def _stored_by_target(source: ModelSource) -> dict[str, list[str]]:
    """Our parameter -> the stored tensors it comes from (Hugging Face experts: one per
    expert, in expert order)."""
    out: dict[str, dict[int, str]] = {}
    for t in source.tensors:
        out.setdefault(tensor_name(t.name), {})[hf_expert(t.name) or 0] = t.name
    return {k: [v[e] for e in sorted(v)] for k, v in out.items()}


def read_rank_weights(source: ModelSource, targets: dict[str, tuple[int, ...]], rank: int,
                      dtype: str | mx.Dtype | None) -> tuple[dict[str, mx.array], int]:
    """This rank's part of every parameter in `targets` (name -> the rank's shape), read
    tensor by tensor and cast to the backend's dtypes; and the bytes read."""
    stored = _stored_by_target(source)
    target = target_dtype(dtype)
    reader = SliceReader(source.files)
    out = {}
    try:
        for name, held in targets.items():
            if name not in stored:
                raise WeightsError(f"{source.path}: the weights lack {name}; the config and "
                                   "weights do not belong together")
            value = reader.read(stored[name], held, rank)
            if mx.issubdtype(value.dtype, mx.floating):
                quantized = f"{name.rpartition('.')[0]}.scales" in targets
                value = value.astype(loaded_dtype(name, value.dtype, quantized, target))
            mx.eval(value)  # one tensor at a time: its stored copy is freed at once
            out[name] = value
    finally:
        reader.close()
    return out, reader.bytes_read


@dataclass
class RankModel:
    model: Model
    pager: ExpertPager | None
    bytes_read: int  # by the tensor-parallel slice reader (0: pipeline, read by MLX)


def build_rank(source: ModelSource, group: mx.distributed.Group, pipeline: bool,
               dtype: str | mx.Dtype | None = None, memory: MemoryPlan | None = None,
               policy: str = "lru", prefetch: bool = True,
               read_threads: int = DEFAULT_READ_THREADS) -> RankModel:
    """This rank's part of the model (see the module doc), evaluated; its experts paged when
    `memory` says so."""
    args = source.args
    paging = memory is not None and memory.paging
    lazy = sanitize({k: v for k, v in read_safetensors(source.files).items()
                     if not (paging and is_expert_tensor(k))}, args)
    check_shapes(args, lazy, str(source.path))  # (shapes only: nothing is read)
    model = model_skeleton(args, source.quantization, _stored_names(source),
                           memory.slots if paging else None)
    nbytes = 0
    if pipeline:  # loaded lazily, then cut: the other ranks' layers are never read
        load_checked(model, cast_weights(lazy, dtype), str(source.path), paging)
        shard_layers(model.model, group)
        held = layer_range(args.num_hidden_layers, group.size(), group.rank())
    else:
        del lazy
        shard_tensors(model, group)
        targets = {k: s for k, s in _shapes(model).items()
                   if not (paging and ".switch_mlp." in k)}
        weights, nbytes = read_rank_weights(source, targets, group.rank(), dtype)
        load_checked(model, weights, str(source.path), paging)
        del weights
        held = range(args.num_hidden_layers)
    lazy = None
    model.fuse()  # after the split: fusing first would read whole tensors to cut them
    pager = _page(model, source, memory, dtype, policy, prefetch, held, group,
                  pipeline, read_threads) if paging else None
    evaluate(model)
    return RankModel(model, pager, nbytes)


def evaluate(model: Model) -> None:
    """Every weight computed, a layer at a time: one `mx.eval` of them all would keep every
    tensor a fused one was concatenated from until the end (a peak of 1.6x the weights). The
    tensors fusing frees are returned to the system at once, not kept in MLX's buffer cache
    (where they count in the process's memory, and fit nothing that comes later)."""
    for layer in model.layers:
        mx.eval(layer.parameters())
        mx.clear_cache()
    mx.eval(model.parameters())


def _page(model: Model, source: ModelSource, memory: MemoryPlan, dtype, policy: str,
          prefetch: bool, held: range, group: mx.distributed.Group,
          pipeline: bool, read_threads: int) -> ExpertPager:
    """This rank's expert slots (as expert_paging.build_paged's, for this rank's share), the
    pager that fills them, and the paged MoE layers."""
    args = source.args
    float_dtype = _slot_float_dtype(source, dtype)
    for layer in model.layers:
        _empty_slots(layer.block_sparse_moe.switch_mlp, float_dtype)
    evaluate(model)
    mlps = [layer.block_sparse_moe.switch_mlp for layer in model.layers]
    size = 1 if pipeline else group.size()
    inter = args.intermediate_size // size
    table = expert_extents(source.files, args.num_hidden_layers,
                           args.num_local_experts)[held.start:held.stop]
    if size > 1:  # cut every extent to this rank's slice of the slot it fills
        views = [_slot_views(m, inter) for m in mlps]
        table = [[[_held_extent(x, views[i][x.dest], group.rank()) for x in expert]
                  for expert in layer] for i, layer in enumerate(table)]
    files = ExpertFiles(source.files, mlps, args.num_local_experts, inter, extents=table)
    pager = ExpertPager(args.num_local_experts, memory.slots,
                        [layer.block_sparse_moe.gate for layer in model.layers],
                        args.num_experts_per_tok, files, policy, prefetch, read_threads)
    for i, layer in enumerate(model.layers):
        moe = layer.block_sparse_moe
        paged = PagedMoE(moe.gate, moe.switch_mlp, moe.top_k, i, pager)
        paged.group = None if pipeline else group
        layer.block_sparse_moe = paged
    return pager


def _held_extent(x: Extent, view: tuple, rank: int) -> Extent:
    """The part of extent `x` that fills this rank's slot (`view`: the slot's NumPy view, its
    dtype name and its rows)."""
    array, _, rows = view
    held = array[0, rows].shape
    part = part_of(x.shape, _itemsize(x.stored), held, rank, x.offset)
    return replace(x, offset=part.offset, nbytes=part.nbytes, count=part.count,
                   stride=part.stride)
