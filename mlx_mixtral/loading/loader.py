"""`load()`: a model and its tokenizer from whatever form the user has, in one pass.

resolve the name -> describe the file or folder (headers only) -> check it fits in memory ->
build the model (lazy, memory-mapped) -> its tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import TokenizerError
from ..model.decoder import Model
from ..model.sharding import check_world
from ..text.tokenizer import Tokenizer, load_folder_tokenizer
from .checkpoint import build_model, sanitize
from .locate import default_model, resolve
from .memory import check_fits
from .safetensors_file import read_safetensors
from .source import ModelSource, describe


def build(source: ModelSource, dtype: str | mx.Dtype | None = None, fuse: bool = True
          ) -> tuple[Model, dict[str, Any]]:
    """The model a description stands for; with GGUF metadata (MLX's reading) for its
    vocabulary, or {} for a folder. `fuse=False` leaves q/k/v and gate/up apart."""
    if source.format == "gguf":
        from .gguf_weights import load_gguf

        return load_gguf(source, dtype, fuse)
    args = source.args
    weights = sanitize(read_safetensors(source.files), args)
    return build_model(args, weights, source.quantization, str(source.path), dtype, fuse), {}


def load_tokenizer(source: ModelSource, metadata: dict[str, Any]) -> Tokenizer:
    if source.format == "gguf":
        from ..text.gguf_vocab import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path, metadata)
    if source.vocabulary == "none":
        raise TokenizerError(f"{source.path}: no tokenizer.model or tokenizer.json in the "
                             "folder; copy the model's tokenizer files into it")
    return load_folder_tokenizer(source.path)


def load(path_or_repo: str | Path | None = None, tokenizer: bool = True, force: bool = False,
         dtype: str | mx.Dtype | None = None, group: mx.distributed.Group | None = None,
         pipeline: bool = False) -> tuple[Model, Tokenizer | None]:
    """(model, tokenizer) from a GGUF file, a model folder, a Hugging Face repo id or
    `ollama:NAME`; with no name, the default model (as the command line picks it).

    Weights stay memory-mapped until first used; `tokenizer=False` skips the tokenizer.
    `dtype` ("float32", "float16", "bfloat16") overrides the backend's choice (float32 on the
    CPU backend, the checkpoint's own on Metal). A model larger than the available memory
    raises `MemoryLimitError` unless `force`.

    `group`: an `mx.distributed` group of several ranks (under `mlx.launch`): the model is split
    over them, by layers with `pipeline`, else tensor parallel; each rank reads only its part."""
    source = describe(resolve(path_or_repo or default_model()))
    ranks = group.size() if group is not None else 1
    check_world(source.args, ranks, pipeline)  # before anything is read
    check_fits(source, force, dtype, ranks)
    model, metadata = build(source, dtype, fuse=ranks == 1)
    if ranks > 1:  # still lazy: the split decides what is read
        model.model.pipeline(group) if pipeline else model.shard(group)
        model.fuse()  # after the split: fusing first would read whole tensors to cut them
    return model, (load_tokenizer(source, metadata) if tokenizer else None)


def load_model(folder: str | Path, lazy: bool = True,
               dtype: str | mx.Dtype | None = None) -> Model:
    """Build a `Model` from a folder with `config.json` and safetensors weights (or a GGUF)."""
    model, _ = build(describe(Path(folder)), dtype)
    if not lazy:
        mx.eval(model.parameters())
    return model
