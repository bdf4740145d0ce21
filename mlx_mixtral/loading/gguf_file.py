"""A GGUF file's header, read once with bounds checks before MLX reads the file, and what it
says: the model's config, its tensors' types and whether they can be read.

MLX's GGUF reader trusts the counts and lengths in the file: an absurd tensor count, metadata
count or string length crashes the interpreter. This walks the header (metadata, tensor infos,
and that every tensor's data lies inside the file), reading only the header, and returns what
it holds: the metadata's scalars and strings (arrays as their length) and the tensor list. A
malformed file raises `WeightsError` naming what is wrong.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, WeightsError

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# Value types: fixed sizes by type id; 8 is a string, 9 an array.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
          12: "d"}
_STRING, _ARRAY = 8, 9
# GGML type ids of float tensors (F32, F16, BF16); every other type is quantized.
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
GGUF_GROUP_SIZE = 32  # MLX reads GGUF's quantized types as affine weights in groups of 32
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    type: int  # a GGMLQuantizationType value
    nbytes: int
    offset: int = 0  # where its data begins in the file (expert streaming reads from there)

    @property
    def count(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        """"F16", "Q4_K" ...: GGML's name of the tensor's type."""
        from gguf.constants import GGMLQuantizationType

        return FLOAT_TYPES.get(self.type) or GGMLQuantizationType(self.type).name


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, object]  # scalars and strings; arrays as their item count
    tensors: list[TensorInfo]


class _CorruptError(Exception):
    """Internal: the header is malformed; the message says how."""


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _CorruptError("the header runs past the end of the file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int | float | bool:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A count read from the file, refused if its items cannot fit in what is left."""
        n = int(self.unpack("Q"))
        if n * min_item_bytes > len(self.buf) - self.pos:
            raise _CorruptError(f"it claims {n} {what}, more than the file can hold")
        return n

    def string(self) -> str:
        raw = self.take(self.count("bytes of a string", 1))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _CorruptError("a metadata string is not UTF-8") from None

    def skip_string(self) -> None:
        self.take(self.count("bytes of a string", 1))

    def skip_strings(self, n: int) -> None:
        pos, end, length_at = self.pos, len(self.buf), _U64.unpack_from
        for _ in range(n):
            if pos + 8 > end:
                raise _CorruptError("the header runs past the end of the file")
            pos += 8 + length_at(self.buf, pos)[0]
        if pos > end:
            raise _CorruptError("the header runs past the end of the file")
        self.pos = pos

    def value(self, kind: int, keep: bool) -> object:
        if kind in _FIXED:
            return self.unpack(_FIXED[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if kind == _ARRAY:
            item = int(self.unpack("I"))
            if item not in _FIXED and item not in (_STRING, _ARRAY):
                raise _CorruptError(f"unknown metadata array type {item}")
            size = struct.calcsize(_FIXED[item]) if item in _FIXED else 8
            n = self.count("array items", size)
            if item in _FIXED:  # fixed-size items: skip them in one step
                self.take(n * size)
            elif item == _STRING:  # vocabularies: 100k+ strings, so a tight loop
                self.skip_strings(n)
            else:
                for _ in range(n):
                    self.value(item, keep=False)
            return n
        raise _CorruptError(f"unknown metadata type {kind}")


def _tensor_bytes(shape: tuple[int, ...], kind: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise _CorruptError(f"unknown tensor type {kind}") from None
    if shape[0] % block:
        raise _CorruptError(f"a row of {shape[0]} is not a whole number of {block}-blocks")
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _parse(buf: mmap.mmap | bytes) -> GGUFHeader:
    r = _Reader(buf)
    if r.take(4) != MAGIC:
        raise _CorruptError("not a GGUF file (bad magic bytes)")
    version = r.unpack("I")
    if version not in (2, 3):
        raise _CorruptError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = r.count("tensors", 24)
    n_kv = r.count("metadata entries", 12)
    alignment = DEFAULT_ALIGNMENT
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string()
        kind = int(r.unpack("I"))
        value = metadata[key] = r.value(kind, keep=True)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise _CorruptError(f"general.alignment {value!r} is not a power of two")
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = int(r.unpack("I"))
        if not 1 <= n_dims <= MAX_DIMS:
            raise _CorruptError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(int(r.unpack("Q")) for _ in range(n_dims))
        if not all(0 < d < 2**40 for d in shape):
            raise _CorruptError(f"tensor {name!r} has the shape {shape}")
        kind = int(r.unpack("I"))
        offset = int(r.unpack("Q"))
        infos.append((name, shape, kind, offset))
    data_start = -(-r.pos // alignment) * alignment
    data_size = len(buf) - data_start
    tensors = []
    for name, shape, kind, offset in infos:
        nbytes = _tensor_bytes(shape, kind)
        if offset % alignment or offset + nbytes > data_size:
            raise _CorruptError(f"tensor {name!r} lies past the end of the file (truncated "
                           "download?)")
        tensors.append(TensorInfo(name, shape, kind, nbytes, data_start + offset))
    return GGUFHeader(metadata, tensors)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of a structurally sound GGUF file; `WeightsError` otherwise."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise _CorruptError("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf)
    except _CorruptError as e:
        raise WeightsError(f"{path}: corrupt GGUF file: {e}; download it again") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None


def read_gguf_vocabulary(path: str | Path) -> dict[str, object]:
    """The file's `tokenizer.*` metadata in full (arrays included), memory-mapped: enough to
    rebuild its tokenizer without reading a tensor."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        return {name: field.contents() for name, field in reader.fields.items()
                if name.startswith("tokenizer.")}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise WeightsError(f"{path}: cannot read the GGUF vocabulary ({e})") from None


def is_gguf(path: Path) -> bool:
    """By the magic bytes: Ollama's blobs have no .gguf suffix."""
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def mlx_bits(qtype: Any) -> int:
    """The MLX affine width that holds a GGUF type without losing precision to it."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    per_weight = math.ceil(size * 8 / block)
    return next(b for b in (2, 3, 4, 5, 6, 8) if b >= min(per_weight, 8))


def unreadable(path: Path, tensor: str, type_name: str) -> WeightsError:
    return WeightsError(
        f"{path}: tensor {tensor} has type {type_name}, which neither MLX nor the gguf package "
        "can read; use a file with another quantization (Q4_K_M, Q8_0, F16 ...)")


def check_readable(path: Path, header: GGUFHeader) -> None:
    """Refuse, by name, a tensor type that neither MLX nor the gguf package reads."""
    import gguf.quants

    readable = {"F32", "F16", *(t.name for t in getattr(gguf.quants, "_type_traits", {}))}
    for t in header.tensors:
        if t.type_name not in readable:
            raise unreadable(path, t.name, t.type_name)


def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if hasattr(value, "tolist"):  # an MLX array, from MLX's reading of the file
        value = value.item() if getattr(value, "size", 0) == 1 else value.tolist()
    return value


def _count(value: Any) -> int:
    """A metadata count as an int (0 when absent); anything else is refused by ModelArgs."""
    if value is None:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def config_from_metadata(metadata: dict[str, Any], path: Path) -> dict[str, Any]:
    """A Hugging Face style config dict from GGUF metadata."""
    arch = _meta(metadata, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported "
                          "(only 'llama': Mistral, Mixtral and other llama models)")

    def key(name: str, default: Any = None) -> Any:
        return _meta(metadata, f"llama.{name}", default)

    tokens = metadata.get("tokenizer.ggml.tokens")
    experts = _count(key("expert_count"))
    config = {
        "model_type": "mixtral" if experts > 1 else "mistral",
        # (the header walk gives the token list as its length; MLX's reader as the list)
        "vocab_size": key("vocab_size") or (len(tokens) if isinstance(tokens, list) else tokens
                                            if isinstance(tokens, int) else None),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": key("attention.key_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
    }
    if experts > 1:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = key("expert_used_count", 2)
    missing = [k for k, v in config.items() if v is None and k != "head_dim"]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    if experts < 0:
        raise ConfigError(f"{path}: GGUF metadata llama.expert_count is not a count")
    return config


def header_config(header: GGUFHeader, path: Path) -> dict[str, Any]:
    """The model's config as the header describes it (no output tensor: a tied head)."""
    config = config_from_metadata(header.metadata, path)
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in header.tensors)
    return config
