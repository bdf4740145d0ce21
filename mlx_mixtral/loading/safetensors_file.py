"""Safetensors files, checked before MLX reads them, and read lazily (memory-mapped).

Pickled weights (`.bin`, `.pt`, `.pth`) are never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def check_safetensors(path: Path) -> dict:
    """The header of a sound safetensors file; refuse one whose header lies (MLX would only
    fail later, with a message about its internals)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file (no header); download it again")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file (header length "
                               f"{header_len} in a {size}-byte file); download it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header (not JSON); download it "
                               "again") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header; download it again")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise WeightsError(f"{path}: tensor {name!r} lies past the end of the file "
                               "(truncated download?); download it again")
    return header


def safetensors_files(folder: Path) -> list[Path]:
    """A folder's weight files; refuses a folder that holds only pickles."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise WeightsError(
            f"{folder}: only pickled weights ({', '.join(pickles[:3])}); they are refused "
            "because unpickling can run code. Get the safetensors version of the model "
            "(most Hugging Face repos have one) or convert it with transformers' "
            "save_pretrained(..., safe_serialization=True) on a trusted machine."
        )
    raise WeightsError(f"{folder}: no *.safetensors weight files")


def read_safetensors(files: list[Path]) -> dict:
    """All tensors of `files` as lazy MLX arrays (headers already checked)."""
    import mlx.core as mx

    weights: dict[str, mx.array] = {}
    for path in files:
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError, OSError) as e:  # what mx.load raises on a bad file
            raise WeightsError(f"{path}: cannot read safetensors ({e}); download it "
                               "again") from None
    return weights
