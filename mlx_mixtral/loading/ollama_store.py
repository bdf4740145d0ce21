"""Ollama's local model store ($OLLAMA_MODELS): from `ollama:NAME[:TAG]` to a file or folder
that the rest of loading reads like any other.

A manifest, `manifests/<host>/<namespace>/<model>/<tag>` (JSON), lists the model's layers by
mediaType and digest; a layer's bytes are the file `blobs/sha256-<hex>`. Two kinds of model
(as ollama/ollama writes them; see the file names below):

- a GGUF model: one `application/vnd.ollama.image.model` layer, the GGUF file itself;
- a safetensors model (`ollama create` from a safetensors folder, run by Ollama's MLX engine):
  `application/vnd.ollama.image.tensor` layers, each blob a whole safetensors file holding one
  tensor or a few under their checkpoint names (the layer's `name` only labels it:
  x/create/writer.go, x/mlxrunner/runner.go `loadTensorsFromManifest` reads every key of every
  tensor blob), and `application/vnd.ollama.image.json` layers, the source folder's `*.json`
  files (config.json, tokenizer.json, tokenizer_config.json ...) named by their file names
  (x/create/pipeline.go `importConfigBlobs`). A speculative-decoding draft rides in the same
  manifest ("draft."-prefixed tensors, "draft/" files: x/create/draft.go); it is not ours.

A safetensors model becomes a model folder in our cache holding symlinks to its blobs (the
weights as `sha256-<hex>.safetensors`): no weight byte is copied, and the folder loads like any
safetensors folder. Only what Ollama quantized itself is written anew (ollama_quant.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from functools import partial
from pathlib import Path

from ..errors import WeightsError
from ..jsonfile import read_json_object
from ..user_files import cache_dir
from .ollama_quant import Layer, blob_layers, quantization, write_mlx_blob
from .safetensors_file import check_safetensors

MODEL_LAYER = "application/vnd.ollama.image.model"  # a GGUF file
TENSOR_LAYER = "application/vnd.ollama.image.tensor"  # a safetensors file
JSON_LAYER = "application/vnd.ollama.image.json"  # one of the source folder's .json files
DRAFT_TENSORS, DRAFT_FILES = "draft.", "draft/"  # a draft model's layers (not ours)
_DIGEST = re.compile(r"sha256:[0-9a-f]+")  # anything else could name a path outside blobs/
_JSON_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.json")  # a plain file name, no folders


def ollama_store() -> Path:
    """Where Ollama keeps its models ($OLLAMA_MODELS, as Ollama reads it)."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def manifest_path(name: str) -> Path:
    """The manifest of `NAME[:TAG]` (as Ollama completes a short name), present or not."""
    model, _, tag = name.partition(":")
    if not model:
        raise WeightsError("ollama: needs a model name, like ollama:mixtral:8x7b")
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return ollama_store().joinpath("manifests", *parts, tag or "latest")


def _layers(manifest: Path) -> list[dict]:
    """The manifest's layers, each a dict with a sound digest; WeightsError otherwise."""
    bad = WeightsError(f"{manifest}: not an Ollama manifest with a model layer (GGUF or "
                       "safetensors tensors); pull the model again")
    try:
        layers = json.loads(manifest.read_bytes()).get("layers")
    except OSError as e:
        raise WeightsError(f"{manifest}: cannot read ({e.strerror or e})") from None
    except (ValueError, AttributeError, RecursionError):
        raise bad from None
    if not isinstance(layers, list) or not all(
            isinstance(x, dict) and isinstance(x.get("digest"), str)
            and _DIGEST.fullmatch(x["digest"]) for x in layers):
        raise bad
    return layers


def _blob(name: str, layer: dict) -> Path:
    blob = ollama_store() / "blobs" / layer["digest"].replace(":", "-")
    if not blob.is_file():
        raise WeightsError(f"ollama:{name}: its blob {blob.name} is missing from "
                           f"{ollama_store()}; pull the model again")
    return blob


def ollama_model(name: str) -> Path:
    """What `ollama:NAME[:TAG]` loads from: its GGUF blob, or a folder of its safetensors
    layers (see the module doc)."""
    manifest = manifest_path(name)
    if not manifest.is_file():
        raise WeightsError(f"ollama:{name}: no such model in {ollama_store()} (pull it with "
                           f"`ollama pull {name}`)")
    layers = _layers(manifest)
    gguf = next((x for x in layers if x.get("mediaType") == MODEL_LAYER), None)
    if gguf is not None:
        return _blob(name, gguf)
    tensors = [x for x in layers if x.get("mediaType") == TENSOR_LAYER
               and not str(x.get("name", "")).startswith(DRAFT_TENSORS)]
    if not tensors:
        raise WeightsError(f"{manifest}: not an Ollama manifest with a model layer (GGUF or "
                           "safetensors tensors); pull the model again")
    files: dict[str, Path | partial] = {**_json_files(name, manifest, layers)}  # link or write
    quantized: dict[str, Layer] = {}
    for layer in tensors:
        blob = _blob(name, layer)
        header = check_safetensors(blob)
        found = blob_layers(name, blob, header)
        file = f"{blob.name}.safetensors"  # by digest: a blob listed twice, once
        files[file] = blob if not found else partial(write_mlx_blob, blob, header)
        quantized.update(found)
    if quantized:
        config = {**read_json_object(files["config.json"], WeightsError),
                  "quantization": quantization(quantized)}
        files["config.json"] = partial(_write_json, config)
    return _folder(manifest, files)


def _write_json(data: dict, dest: Path) -> None:
    dest.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _json_files(name: str, manifest: Path, layers: list[dict]) -> dict[str, Path]:
    """{file name: blob} of the model's own .json files (config.json among them); names that
    end in .json never meet the weights' `sha256-<hex>.safetensors`."""
    files = {}
    for layer in layers:
        if layer.get("mediaType") != JSON_LAYER:
            continue
        file = layer.get("name")
        if not isinstance(file, str) or file.startswith(DRAFT_FILES):
            continue
        if not _JSON_NAME.fullmatch(file):
            raise WeightsError(f"{manifest}: a layer is named {file[:60]!r}, not a .json file "
                               "name; pull the model again")
        files[file] = _blob(name, layer)
    if "config.json" not in files:
        raise WeightsError(f"{manifest}: its safetensors model has no config.json layer; "
                           "pull the model again")
    return files


def _folder(manifest: Path, files: dict[str, Path | partial]) -> Path:
    """The cache folder standing for the model: {file name: the blob it links to, or what
    writes it}. Named after what it holds (another store, a model pulled again: another
    folder); built once, atomically (a folder that exists is complete)."""
    recipe = {file: str(how.resolve()) if isinstance(how, Path) else _recipe(how)
              for file, how in sorted(files.items())}
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{manifest.parent.name}-{manifest.name}")
    folder = cache_dir() / "ollama" / f"{model}-{digest}"  # one name, however NAME was spelled
    if folder.is_dir():
        return folder
    building = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        for file, how in files.items():
            if isinstance(how, Path):
                (building / file).symlink_to(how.resolve())
            else:
                how(building / file)
        building.rename(folder)
    except OSError as e:
        if not folder.is_dir():  # not another process that built it first
            raise WeightsError(f"cannot write {folder} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _recipe(how: partial) -> str:
    """What a written file is made from, for the folder's name: its blob, or its JSON."""
    first = how.args[0]
    made_of = str(first.resolve()) if isinstance(first, Path) else json.dumps(first,
                                                                              sort_keys=True)
    return f"{how.func.__name__}:{made_of}"
