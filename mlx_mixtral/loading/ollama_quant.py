"""Ollama's own quantization of a safetensors model (`ollama create --quantize int4|int8`), in
the layout the rest of loading reads (mlx-lm's).

Ollama quantizes with MLX's affine quantization too, but stores `W.weight` (packed words) with
`W.weight.scale` and `W.weight.bias`, and says the kind in the blob's safetensors metadata:
`quant_type` and `group_size` for the whole blob, or `W.weight.quant_type` and
`W.weight.group_size` per tensor (ollama/ollama x/create/quantize.go); `int4` and `int8` are
affine with groups of 64 unless said (x/quant/quant.go), and its int4 keeps some projections
8-bit (x/create/create.go `GetTensorQuantization`). mlx-lm's layout names them `W.scales` and
`W.biases` and puts the bits in config.json's `quantization`, per layer where they differ.

A quantized blob is rewritten under the new names (its tensor bytes copied: a file's tensor
names live in its header, at its start); config.json gets the `quantization` block.
Ollama's floating-point kinds (nvfp4, mxfp4, mxfp8) are refused.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from ..errors import WeightsError

AFFINE_BITS = {"int4": 4, "int8": 8, "q4": 4, "q8": 8, "fp4": 4, "fp8": 8}  # Ollama's aliases
DEFAULT_GROUP = 64
RENAMES = {".weight.scale": ".scales", ".weight.bias": ".biases"}  # Ollama's -> mlx-lm's

Layer = tuple[int, int]  # (group size, bits)


def blob_layers(name: str, blob: Path, header: dict) -> dict[str, Layer]:
    """{layer (its checkpoint name, "model.layers.0.self_attn.q_proj"): (group, bits)} of
    the layers `blob` holds quantized; {} for a blob of plain tensors."""
    metadata = header.get("__metadata__")
    metadata = metadata if isinstance(metadata, dict) else {}
    layers = {}
    for key in header:
        if not key.endswith(".weight.scale"):
            continue
        weight = key.removesuffix(".scale")
        kind = str(metadata.get(f"{weight}.quant_type") or metadata.get("quant_type") or "")
        if kind.lower() not in AFFINE_BITS:
            raise WeightsError(f"ollama:{name}: quantized by Ollama as {kind or 'unknown'}, "
                               "which mlx-mixtral does not read (int4 and int8 it does); "
                               "import it as int4, int8 or unquantized, or load its source "
                               "folder")
        group = metadata.get(f"{weight}.group_size") or metadata.get("group_size")
        try:
            group = int(group) if group is not None else DEFAULT_GROUP
        except ValueError:
            raise WeightsError(f"{blob}: group size {group!r} is not a number; pull the "
                               "model again") from None
        if weight not in header:
            raise WeightsError(f"{blob}: holds {key} but not {weight}; pull the model again")
        layers[weight.removesuffix(".weight")] = (group, AFFINE_BITS[kind.lower()])
    return layers


def mlx_name(key: str) -> str:
    for theirs, ours in RENAMES.items():
        if key.endswith(theirs):
            return key.removesuffix(theirs) + ours
    return key


def write_mlx_blob(blob: Path, header: dict, dest: Path) -> None:
    """`blob` as a safetensors file with mlx-lm's names: the same bytes after a new header
    (offsets count from the end of the header, so they stand)."""
    renamed = {mlx_name(k): v for k, v in header.items()}
    head = json.dumps(renamed).encode()
    head += b" " * (-len(head) % 8)
    with blob.open("rb") as src, dest.open("wb") as out:
        src.seek(8 + int.from_bytes(src.read(8), "little"))
        out.write(len(head).to_bytes(8, "little") + head)
        shutil.copyfileobj(src, out, 1 << 20)


def quantization(layers: dict[str, Layer]) -> dict:
    """config.json's `quantization` for `layers` (checkpoint names): the most common kind
    at the top, the others per layer under the names the model's modules take."""
    from .checkpoint import module_name

    (group, bits), _ = Counter(layers.values()).most_common(1)[0]
    block: dict = {"group_size": group, "bits": bits, "mode": "affine"}
    modules: dict[str, set[Layer]] = {}
    for layer, kind in layers.items():
        modules.setdefault(module_name(layer), set()).add(kind)
    for module, kinds in sorted(modules.items()):
        if len(kinds) > 1:
            raise WeightsError(f"{module}: its experts are quantized unalike, which one "
                               "stacked layer cannot hold")
        (g, b), = kinds
        if (g, b) != (group, bits):
            block[module] = {"group_size": g, "bits": b}
    return block
