"""A GGUF file (or `ollama:NAME`'s GGUF blob) as convert's source: its tensors under our names,
which of them are stored quantized and how, and its vocabulary as tokenizer files.

- A file whose types MLX reads (F32, F16, Q4_0, Q4_1, Q8_0) is read as loading reads it: its
  quantized tensors already are MLX affine weights (group 32), written bit for bit, so the folder
  runs exactly as the GGUF does. MLX's reader is not lazy: the whole file is in memory while
  the folder is written (reading its blocks per tensor would need the Q4_0/Q4_1/Q8_0 -> MLX
  block layout done here, tensor by tensor).
- Other types (K-quants, I-quants, Q5_x ...) have no exact MLX form, and MLX refuses the whole
  file: the gguf package dequantizes it tensor by tensor, each cast to the output dtype and, with
  -q, quantized as the plan says before the next is read (memory: about the output's size).
  One line says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import TokenizerError
from ..loading.gguf_file import read_gguf_vocabulary
from ..loading.gguf_weights import gguf_weights, our_module
from ..loading.source import ModelSource
from .plan import Plan

MLX_TYPES = frozenset({"F32", "F16", "Q4_0", "Q4_1", "Q8_0"})  # what mx.load reads exactly


@dataclass
class GGUFWeights:
    weights: dict[str, mx.array]  # our names, experts stacked
    quantized: dict[str, dict]  # module -> {"group_size", "bits"} of each stored quantized
    note: str | None = None  # what was not kept as it was
    metadata: dict | None = None  # MLX's reading of the file's metadata, when MLX read it


def read_gguf(source: ModelSource, plan: Plan) -> GGUFWeights:
    """The file's tensors for convert (see the module doc)."""
    odd = sorted({t.dtype for t in source.tensors} - MLX_TYPES)
    if odd:
        return _dequantized(source, plan, odd)
    weights, quantization, metadata = gguf_weights(source)
    quantized = {k: v for k, v in (quantization or {}).items() if isinstance(v, dict)}
    return GGUFWeights(weights, quantized, metadata=metadata)


def _dequantized(source: ModelSource, plan: Plan, odd: list[str]) -> GGUFWeights:
    import gguf

    reader = gguf.GGUFReader(str(source.path))
    tensors: dict[str, mx.array] = {}
    quantized: dict[str, dict] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # memory-mapped: one at a time
        value = mx.array(np.asarray(data, np.float32).reshape(shape)).astype(plan.dtype)
        stem, _, param = t.name.rpartition(".")
        module = our_module(t.name)
        bits = plan.bits_for(module, shape) if param == "weight" else None
        if bits is None:
            mx.eval(value)
            tensors[t.name] = value
            continue
        q, scales, biases = mx.quantize(value, plan.group_size, bits, mode=plan.mode)
        mx.eval(q, scales, biases)
        tensors.update({t.name: q, f"{stem}.scales": scales, f"{stem}.biases": biases})
        quantized[module] = {"group_size": plan.group_size, "bits": bits}
    weights, _, _ = gguf_weights(source, tensors)
    dtype = str(plan.dtype).rpartition(".")[2]
    then = (f" and quantized to {plan.bits} bits (group {plan.group_size})" if plan.bits
            else " (pass -q to quantize them)")
    note = (f"Note: {source.path.name} holds {', '.join(odd)} tensors, which have no exact MLX "
            f"form: they were dequantized to {dtype}{then}")
    return GGUFWeights(weights, quantized, note)


def write_tokenizer(path: Path, folder: Path, metadata: dict | None) -> bool:
    """The GGUF's vocabulary (from `metadata` when MLX read it: the gguf package takes seconds
    over a large vocabulary) as `folder`'s tokenizer files; False when it cannot be rebuilt
    (the summary then says to copy the model's own)."""
    from ..text.gguf_vocab import gguf_tokenizer_files

    try:
        files = gguf_tokenizer_files(path, metadata or read_gguf_vocabulary(path))
    except TokenizerError:
        return False
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return True
