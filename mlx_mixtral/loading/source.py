"""What a model file or folder holds, read once from its headers: the one description that
the memory check, `info` and the model builder share.

Reading it opens no tensor data: safetensors headers, `config.json`, or the GGUF header walk.
Pickled weights are refused here, before anything else looks at them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, WeightsError
from ..jsonfile import read_json_object
from ..model.config import ModelArgs
from ..text.tokenizer import no_tokenizer, vocabulary_file
from .gguf_file import check_readable, header_config, is_gguf, read_gguf_header
from .safetensors_file import PICKLE_SUFFIXES, check_safetensors, safetensors_files


@dataclass(frozen=True)
class TensorSpec:
    name: str  # as stored in the file
    dtype: str  # safetensors dtype ("BF16", "U32" ...) or GGML type name ("Q4_K" ...)
    nbytes: int  # bytes in the file
    count: int  # elements (for a packed quantized weight: its packed words)
    offset: int = 0  # GGUF: where its data begins in the file (its experts are read from there)


@dataclass
class ModelSource:
    path: Path
    format: str  # "safetensors" or "gguf"
    config: dict[str, Any]  # Hugging Face style
    tensors: list[TensorSpec]
    vocabulary: str  # "tokenizer.model", "tokenizer.json", "gguf:llama", "gguf:gpt2" or "none"
    files: list[Path] = field(default_factory=list)  # the safetensors shards
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF scalars and strings

    @property
    def args(self) -> ModelArgs:
        try:
            return ModelArgs.from_dict(self.config)
        except ConfigError as e:
            where = self.path / "config.json" if self.format == "safetensors" else self.path
            raise ConfigError(f"{where}: {e}") from None

    @property
    def quantization(self) -> dict[str, Any] | None:
        q = self.config.get("quantization")
        return q if isinstance(q, dict) else None


def read_config(folder: Path) -> dict[str, Any]:
    """The JSON object in a folder's config.json."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json in this folder; pass the folder that holds "
                          "the model's config.json and weights")
    return read_json_object(path, ConfigError)


def load_config(folder: str | Path) -> tuple[ModelArgs, dict[str, Any]]:
    """A folder's `ModelArgs`, and its raw config (for `quantization` and the like)."""
    config = read_config(Path(folder))
    try:
        return ModelArgs.from_dict(config), config
    except ConfigError as e:
        raise ConfigError(f"{Path(folder) / 'config.json'}: {e}") from None


def _describe_folder(folder: Path) -> ModelSource:
    config = read_config(folder)
    files = safetensors_files(folder)
    tensors = []
    for path in files:
        for name, info in check_safetensors(path).items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            count = 1
            for d in info.get("shape") or []:
                count *= int(d)
            tensors.append(TensorSpec(name, str(info.get("dtype")), end - start, count))
    vocabulary = vocabulary_file(folder) or "none"
    return ModelSource(folder, "safetensors", config, tensors, vocabulary, files)


def require_vocabulary(source: ModelSource) -> None:
    """A folder without tokenizer files: TokenizerError, before a weight is read."""
    if source.vocabulary == "none":
        raise no_tokenizer(source.path)


def _describe_gguf(path: Path) -> ModelSource:
    header = read_gguf_header(path)
    check_readable(path, header)
    tensors = [TensorSpec(t.name, t.type_name, t.nbytes, t.count, t.offset)
               for t in header.tensors]
    vocabulary = f"gguf:{header.metadata.get('tokenizer.ggml.model')}"
    return ModelSource(path, "gguf", header_config(header, path), tensors, vocabulary,
                       metadata=header.metadata)


def describe(path: str | Path) -> ModelSource:
    """The description of a model folder or GGUF file (see the module doc); a name to resolve
    (a repo id, `demo`, `ollama:NAME`) is `resolve`'s to turn into that path first."""
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file or folder")
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: pickled weights are refused (unpickling can run code); "
                           "use the model's safetensors or GGUF files")
    if not is_gguf(path):
        raise WeightsError(_not_a_model_file(path))
    return _describe_gguf(path)


def _not_a_model_file(path: Path) -> str:
    """What to give instead of a file that is neither a GGUF nor a folder: a weights file
    alone has no config, so its folder is the model."""
    expected = "a model is a folder with config.json and its .safetensors weights, or a .gguf file"
    if path.suffix == ".gguf":
        return f"{path}: not a GGUF file (it does not begin as one); download it again"
    if path.suffix == ".safetensors":
        here = (f"; give its folder, {path.parent}" if (path.parent / "config.json").is_file()
                else "")
        return f"{path}: a single weights file is not a model: {expected}{here}"
    return f"{path}: not a model file: {expected}"
