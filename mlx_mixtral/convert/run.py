"""Streaming, atomic conversion of a checkpoint (a folder or a GGUF file) into an MLX folder.

Every output tensor is first described as a lazy MLX graph (memory-mapped source -> stacked
experts -> cast -> quantize; in the per-expert layout, then one row per expert). The graphs are
grouped into shards by their output size, and each shard is evaluated and written on its own,
so peak memory is about one output shard plus the source tensors it reads, never the whole
model. Everything is written into a hidden folder beside OUT, which is renamed to OUT only
when complete: an interrupted run leaves no OUT.

The source is a Hugging Face or MLX folder (a repo id, `ollama:NAME` of a safetensors model), or
a GGUF file (`ollama:NAME` of a GGUF model): gguf_source.py reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from ..errors import ConvertError
from ..loading.checkpoint import sanitize
from ..loading.locate import resolve
from ..loading.safetensors_file import read_safetensors
from ..loading.source import ModelSource, describe
from ..model.config import ModelArgs
from ..model.precision import DTYPES
from ..text.tokenizer import VOCABULARY_FILES, vocabulary_file
from ..units import human
from ..user_files import writer_alive
from .expert_layout import LAYOUTS, tensor_groups
from .gguf_source import read_gguf, write_tokenizer
from .plan import Q_BITS, Q_GROUP_SIZES, Plan, recipe_bits

# Files copied as they are: tokenizers, chat templates, generation defaults.
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tekken.json",
)
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class Summary:
    out: Path
    parameters: int
    bytes_on_disk: int
    bits_per_weight: float
    shards: int
    seconds: float
    tokenizer: bool = True  # a tokenizer file came along (without one, nothing can chat)
    note: str | None = None  # what the source lost on the way (a GGUF's types MLX lacks)
    source: Path | None = None  # what was converted, resolved (a repo id's folder ...)

    def __str__(self) -> str:
        text = (f"Wrote {self.out}: {human(self.parameters, 'B')} parameters, "
                f"{self.bits_per_weight:.2f} bits per weight, "
                f"{human(self.bytes_on_disk)}B on disk in {self.shards} shard(s), "
                f"{self.seconds:.1f} s")
        if self.note:
            text += f"\n{self.note}"
        if not self.tokenizer:
            text += (f"\nNote: the source had no {' or '.join(VOCABULARY_FILES)}; copy the "
                     f"model's tokenizer files into {self.out} before generating with it")
        return text



def _partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _remove_stale_partials(out: Path) -> None:
    """Folders left by a killed run (its process is gone) are removed."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not writer_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _source_dtype(config: dict) -> mx.Dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float16"
    return DTYPES.get(name, mx.float16)


def _dequantize(weights: dict[str, mx.array], quantization: dict) -> dict[str, mx.array]:
    """Turn an MLX-quantized checkpoint back into float tensors."""
    out = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.rpartition(".")[0]
        scales = weights.get(f"{module}.scales")
        if name.endswith(".weight") and scales is not None:
            spec = quantization.get(module)
            spec = spec if isinstance(spec, dict) else quantization
            biases = weights.get(f"{module}.biases")
            if mx.issubdtype(scales.dtype, mx.floating):  # affine: float32, rounded once
                scales = scales.astype(mx.float32)  # to the output dtype, not first to theirs
                biases = None if biases is None else biases.astype(mx.float32)
            value = mx.dequantize(value, scales, biases,
                                  spec.get("group_size", 64), spec["bits"],
                                  mode=spec.get("mode", "affine"))
        out[name] = value
    return out


def _output_tensors(weights: dict[str, mx.array], plan: Plan,
                    layers: dict[str, int | None], cast: bool = True) -> dict[str, mx.array]:
    """Lazy output tensors (floats in `plan.dtype`, or their own without `cast`); records each
    quantizable module's bits in `layers`."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            out[name] = value
            continue
        if cast:
            value = value.astype(plan.dtype)
        module, _, param = name.rpartition(".")
        bits = plan.bits_for(module, value.shape) if param == "weight" else None
        if param == "weight" and value.ndim >= 2:
            layers[module] = bits
        if bits is None:
            out[name] = value
            continue
        q, scales, *biases = mx.quantize(value, plan.group_size, bits, mode=plan.mode)
        out[name] = q
        out[f"{module}.scales"] = scales
        if biases:
            out[f"{module}.biases"] = biases[0]
    return out


def _shards(groups: list[dict[str, mx.array]], max_bytes: int
            ) -> Iterator[dict[str, mx.array]]:
    """Consecutive groups (expert_layout.py's) per shard; a group is never split."""
    shard: dict[str, mx.array] = {}
    size = 0
    for group in groups:
        nbytes = sum(v.nbytes for v in group.values())
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard.update(group)
        size += nbytes
    if shard:
        yield shard


def make_plan(dtype: mx.Dtype, quantize: bool, q_bits: int, group_size: int,
              expert_bits: int | None, recipe: str | None) -> Plan:
    """The precision plan for convert's options; a recipe or expert bits imply quantizing."""
    if recipe is not None:
        if expert_bits is not None:
            raise ConvertError("recipe sets the expert bits itself; leave out expert_bits",
                               params=("recipe", "expert_bits"))
        expert_bits, q_bits = recipe_bits(recipe)
    for name, bits in (("q_bits", q_bits), ("expert_bits", expert_bits)):
        if bits is not None and bits not in Q_BITS:
            raise ConvertError(f"{name}={bits} is not one of {', '.join(map(str, Q_BITS))}",
                               params=(name,))
    if group_size not in Q_GROUP_SIZES:
        raise ConvertError(f"q_group_size={group_size} is not one of "
                           f"{', '.join(map(str, Q_GROUP_SIZES))}", params=("q_group_size",))
    quantize = quantize or expert_bits is not None
    return Plan(dtype=dtype, bits=q_bits if quantize else None, group_size=group_size,
                expert_bits=expert_bits if quantize else None)


def _count_parameters(weights: dict[str, mx.array], kept: dict[str, dict]) -> int:
    """Weights counted unpacked (a module stored quantized packs 32 / bits per word)."""
    count = 0
    for name, value in weights.items():
        module, _, param = name.rpartition(".")
        if param in ("scales", "biases"):
            continue
        count += value.size * 32 // kept[module]["bits"] if module in kept else value.size
    return count


@dataclass
class _Read:
    """The source's tensors (our names, lazy where they can be) and what convert says of it."""

    weights: dict[str, mx.array]
    kept: dict[str, dict] = field(default_factory=dict)  # module -> quantization, as stored
    note: str | None = None
    metadata: dict | None = None  # a GGUF's, as MLX read it (its vocabulary)


def _read_folder(source: ModelSource, plan: Plan, dequantize: bool, layout: str) -> _Read:
    """A safetensors folder's tensors under our names; an MLX-quantized one's in floats, or,
    to rewrite its experts in the per-expert layout, as they are."""
    weights = sanitize(read_safetensors(source.files), source.args)
    source_quant = source.quantization
    if dequantize:
        if source_quant is None:
            raise ConvertError(f"{source.path}: dequantize=True needs a quantized MLX folder "
                               "or GGUF file", params=("dequantize",))
        return _Read(_dequantize(weights, source_quant))
    if source_quant is None:
        return _Read(weights)
    if layout == "stacked" or plan.bits is not None:
        raise ConvertError(f"{source.path} is already quantized; pass dequantize=True to turn "
                           "it back into floats (or use it as it is; layout=per-expert "
                           "without quantizing rewrites its experts as they are)",
                           params=("dequantize", "layout"))
    return _Read(weights, _stored_quantization(weights, source_quant))


def _stored_quantization(weights: dict[str, mx.array], quantization: dict) -> dict[str, dict]:
    """Each quantized module's entry (its own, else the folder's defaults)."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    modules = (name.rpartition(".")[0] for name in weights if name.endswith(".scales"))
    return {m: quantization[m] if isinstance(quantization.get(m), dict) else defaults
            for m in modules}


def _read_gguf(source: ModelSource, plan: Plan, dequantize: bool) -> _Read:
    """A GGUF's tensors (gguf_source.py): its MLX-readable quantized ones kept as they are,
    or all in floats with `dequantize`."""
    read = read_gguf(source, plan)
    if not dequantize:
        return _Read(read.weights, read.quantized, read.note, read.metadata)
    if not read.quantized:
        raise ConvertError(f"{source.path}: dequantize=True needs a quantized MLX folder or "
                           "GGUF file", params=("dequantize",))
    return _Read(_dequantize(read.weights, read.quantized), {}, read.note, read.metadata)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    expert_bits: int | None = None,
    recipe: str | None = None,
    dtype: str | None = None,
    dequantize: bool = False,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    layout: str = "stacked",
) -> Summary:
    """Convert a Hugging Face folder or repo id (or an MLX folder), a GGUF file or
    `ollama:NAME` into an MLX folder; `layout="per-expert"` writes each expert in one range.

    See `mlx-mixtral convert --help`; returns what was written."""
    start = time.perf_counter()
    src, out = resolve(hf_path), Path(mlx_path)
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass force=True to replace it",
                           params=("force",))
    plan = make_plan(DTYPES[dtype] if dtype else mx.float16, quantize, q_bits, q_group_size,
                     expert_bits, recipe)  # checked before anything is read
    if layout not in LAYOUTS:
        raise ConvertError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}",
                           params=("layout",))
    if plan.bits is not None and dequantize:
        raise ConvertError("quantize=True (or recipe, expert_bits) and dequantize=True exclude "
                           "each other", params=("quantize", "recipe", "expert_bits", "dequantize"))
    source = describe(src)
    args, config = source.args, source.config
    if dtype is None:
        plan = replace(plan, dtype=_source_dtype(config))
    read = (_read_gguf(source, plan, dequantize) if source.format == "gguf"
            else _read_folder(source, plan, dequantize, layout))
    weights, read.weights = read.weights, {}  # `weights` alone holds them: freed below

    layers: dict[str, int | None] = {}
    parameters = _count_parameters(weights, read.kept)
    # A GGUF's tensors, and a quantized folder's, keep their dtypes unless one is asked for.
    cast = dtype is not None or (source.format != "gguf" and not read.kept)
    groups = tensor_groups(_output_tensors(weights, plan, layers, cast),
                           args.num_local_experts, layout)
    shards = list(_shards(groups, shard_bytes))
    del groups
    # From here on only the lazy graphs in `shards` reference the (memory-mapped) sources, so
    # each source tensor and each written shard is freed as soon as it has been used.
    del weights

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    work = _partial_folder(out)
    work.mkdir()
    try:
        weight_map, total = _write_shards(shards, work, progress)
        _write_config(config, plan, layers, args, work, read.kept)
        (work / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
        for name in SIDE_FILES:
            if src.is_dir() and (src / name).is_file():
                shutil.copyfile(src / name, work / name)
        if source.format == "gguf":
            write_tokenizer(src, work, read.metadata)
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Summary(out, parameters, total, 8 * total / max(parameters, 1),
                   len(set(weight_map.values())), time.perf_counter() - start,
                   vocabulary_file(out) is not None, read.note, src)


_SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16",
                       mx.uint32: "U32", mx.int32: "I32", mx.uint8: "U8", mx.int8: "I8",
                       mx.uint16: "U16", mx.int16: "I16", mx.int64: "I64", mx.uint64: "U64",
                       mx.bool_: "BOOL"}


def _stream_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str],
                        written: Callable[[str], None]) -> int:
    """Write `tensors` (lazy) as one safetensors file, computing and writing one tensor at a
    time: the header is known from shapes alone, so a shard is never whole in memory.
    Each tensor is released once written. Returns the data bytes written."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, value in tensors.items():
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in list(tensors):
            value = tensors.pop(name)
            mx.eval(value)
            f.write(memoryview(value))
            del value
            written(name)
    return offset


def _write_shards(shards: list[dict[str, mx.array]], work: Path,
                  progress: bool) -> tuple[dict[str, str], int]:
    weight_map: dict[str, str] = {}
    total = 0
    count = len(shards)
    with tqdm(total=sum(len(s) for s in shards), unit="tensor", disable=not progress,
              desc="Converting") as bar:
        for i in range(count):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"

            def written(key: str, name: str = name) -> None:
                weight_map[key] = name
                bar.update(1)

            total += _stream_safetensors(work / name, shards[i], {"format": "mlx"}, written)
    return weight_map, total


def _write_config(config: dict, plan: Plan, layers: dict[str, int | None], args: ModelArgs,
                  work: Path, kept: dict[str, dict]) -> None:
    """config.json: the source's (a GGUF's as read from its metadata), with the quantization
    of the layers quantized now (`layers`) and of those stored quantized already (`kept`)."""
    config = {k: v for k, v in config.items()
              if k not in ("quantization", "quantization_config") and v is not None}
    config["rope_theta"] = args.rope_theta  # mlx-lm reads it at the top level
    entry = plan.config_entry(layers)
    if kept:  # mlx-lm wants defaults at the top level: the first kept layer's
        entry = {**(entry or next(iter(kept.values()))), **dict(sorted(kept.items()))}
    if entry is not None:
        config["quantization"] = config["quantization_config"] = entry
    config["torch_dtype"] = next(k for k, v in DTYPES.items() if v == plan.dtype)
    (work / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))


def _publish(work: Path, out: Path) -> None:
    """Rename the finished folder to OUT; an existing OUT (with --force) goes only after."""
    if not out.exists():
        os.replace(work, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
