"""`ollama:NAME` for a model Ollama keeps as safetensors layers (`ollama create` from a
safetensors folder, for its MLX engine): a store laid out here as Ollama writes one, then loaded
and compared with the folder it came from, and damaged stores refused in one line.

The layout, as ollama/ollama writes it (x/create/writer.go, pipeline.go, client/create.go):
every tensor its own `application/vnd.ollama.image.tensor` blob, a whole safetensors file (a
stacked expert group shares one), every `*.json` of the folder an `application/vnd.ollama.image
.json` layer named by its file name, the config blob a docker config with model_format
"safetensors"; a draft model's layers ride along under "draft." and "draft/".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_helpers import in_process, refusal, tiny_folder
from conftest import build_hf, hf_logits, tiny_tokenizer

import mlx_mixtral
from mlx_mixtral.loading import resolve

TENSOR = "application/vnd.ollama.image.tensor"
JSON = "application/vnd.ollama.image.json"


def read_tensors(path: Path) -> dict[str, tuple[dict, bytes]]:
    """{name: (header entry, bytes)} of a safetensors file, read by hand (not by our reader)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return {name: (info, data[info["data_offsets"][0]:info["data_offsets"][1]])
            for name, info in header.items() if name != "__metadata__"}


def safetensors_bytes(tensors: dict[str, tuple[dict, bytes]], metadata: dict | None = None
                      ) -> bytes:
    """A safetensors file holding `tensors`, packed as Ollama packs a blob."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, data = 0, b""
    for name, (info, payload) in tensors.items():
        header[name] = {"dtype": info["dtype"], "shape": info["shape"],
                        "data_offsets": [offset, offset + len(payload)]}
        offset += len(payload)
        data += payload
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


class Store:
    """An Ollama models folder ($OLLAMA_MODELS) being written."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def blob(self, data: bytes, media_type: str, name: str | None = None) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / f"sha256-{digest}").write_bytes(data)
        layer = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        return {**layer, "name": name} if name is not None else layer

    def manifest(self, model: str, layers: list[dict], config: dict | None = None) -> Path:
        path = self.root / "manifests" / "registry.ollama.ai" / "library" / model / "latest"
        path.parent.mkdir(parents=True, exist_ok=True)
        config_layer = self.blob(json.dumps(config or {"model_format": "safetensors",
                                                       "capabilities": ["completion"]}).encode(),
                                 "application/vnd.docker.container.image.v1+json")
        path.write_text(json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": config_layer, "layers": layers}))
        return path


def tensor_layers(store: Store, folder: Path, together: int = 1) -> list[dict]:
    """The folder's tensors as tensor layers: one a blob, but `together` share the last."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(read_tensors(path))
    names = sorted(tensors)
    alone, shared = names[:len(names) - together + 1], names[len(names) - together + 1:]
    layers = [store.blob(safetensors_bytes({n: tensors[n]}), TENSOR, n) for n in alone[:-1]]
    group = [alone[-1], *shared]
    layers.append(store.blob(safetensors_bytes({n: tensors[n] for n in group}), TENSOR,
                             group[0]))
    return layers


def json_layers(store: Store, folder: Path) -> list[dict]:
    return [store.blob(p.read_bytes(), JSON, p.name) for p in sorted(folder.glob("*.json"))
            if p.name != "model.safetensors.index.json"]


def draft_layers(store: Store) -> list[dict]:
    """A draft model's layers: would break the load if taken for the model's own."""
    junk = {"draft.model.embed_tokens.weight": ({"dtype": "F32", "shape": [2, 2]}, bytes(16))}
    return [store.blob(safetensors_bytes(junk), TENSOR, "draft.model.embed_tokens.weight"),
            store.blob(b'{"model_type": "nothing"}', JSON, "draft/config.json")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    return Store(tmp_path / "models")


def test_a_safetensors_layer_model_answers_as_its_folder(folder, store, capsys):
    layers = [*tensor_layers(store, folder, together=3), *json_layers(store, folder),
              *draft_layers(store),
              store.blob(b"{{ .Prompt }}", "application/vnd.ollama.image.template")]
    store.manifest("tiny", layers)
    args = ["generate", "--prompt", "t5 t6 t7", "--temp", "0", "--max-tokens", "8"]
    direct = in_process(capsys, *args, "--model", str(folder))
    pulled = in_process(capsys, *args, "--model", "ollama:tiny")
    assert direct.returncode == pulled.returncode == 0, pulled.stderr
    assert direct.stdout.strip() and pulled.stdout == direct.stdout
    # No weight byte copied: the folder's weights are the store's blobs.
    made = resolve("ollama:tiny")
    assert all(p.is_symlink() and p.resolve().parent == store.root / "blobs"
               for p in made.glob("*.safetensors"))
    assert resolve("ollama:tiny:latest") == made  # built once


def test_a_mixtral_in_tensor_layers_matches_the_reference(tmp_path, store, tokens):
    """Mixtral's per-expert tensors stay apart in Ollama (its expert stacking knows
    `.mlp.experts.`, not `.block_sparse_moe.experts.`): each expert a layer of its own."""
    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    store.manifest("moe", [*tensor_layers(store, tmp_path / "hf"),
                           *json_layers(store, tmp_path / "hf")])
    model, tokenizer = mlx_mixtral.load("ollama:moe")
    ids = tokens(1, 8)
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(ref, ids)).max() <= 1e-4
    assert tokenizer.encode("t5 t6") == [5, 6]


def damage(case: str, store: Store, folder: Path) -> str:
    """Lay out a store damaged as `case` says; the words its refusal names."""
    layers = [*tensor_layers(store, folder), *json_layers(store, folder)]
    if case == "not json":
        store.manifest("tiny", layers).write_text("{not json")
        return "not an Ollama manifest"
    if case == "no weights":
        store.manifest("tiny", [x for x in layers if x["mediaType"] != TENSOR])
        return "not an Ollama manifest with a model layer"
    if case == "digest outside the store":
        layers[0]["digest"] = "sha256:../../../etc/passwd"
        store.manifest("tiny", layers)
        return "not an Ollama manifest"
    if case == "blob missing":
        store.manifest("tiny", layers)
        (store.root / "blobs" / layers[0]["digest"].replace(":", "-")).unlink()
        return "is missing from"
    if case == "no config.json":
        store.manifest("tiny", [x for x in layers if x.get("name") != "config.json"])
        return "no config.json layer"
    if case == "file name with a folder":
        layers[-1]["name"] = "../../config.json"
        store.manifest("tiny", layers)
        return "not a .json file name"
    if case == "truncated tensor blob":
        store.manifest("tiny", layers)
        blob = store.root / "blobs" / layers[0]["digest"].replace(":", "-")
        blob.write_bytes(blob.read_bytes()[:-4])
        return "lies past the end"
    assert case == "quantized by ollama"
    tensors = {"model.norm.weight": ({"dtype": "F32", "shape": [4]}, bytes(16)),
               "model.norm.weight.scale": ({"dtype": "F32", "shape": [1]}, bytes(4))}
    quantized = store.blob(safetensors_bytes(tensors, {"quant_type": "int4"}), TENSOR,
                           "model.norm.weight")
    store.manifest("tiny", [quantized, *layers])
    return "quantized by Ollama (int4)"


@pytest.mark.parametrize("case", ["not json", "no weights", "digest outside the store",
                                  "blob missing", "no config.json", "file name with a folder",
                                  "truncated tensor blob", "quantized by ollama"])
def test_a_damaged_store_is_refused_in_one_line(case, folder, store, capsys):
    words = damage(case, store, folder)
    line = refusal(["generate", "--model", "ollama:tiny", "--prompt", "t5", "--max-tokens",
                    "1"], capsys)
    assert words in line, line


def test_listing_offers_a_safetensors_layer_model(folder, store):
    from mlx_mixtral.catalog.local import ollama_models

    store.manifest("tiny", [*tensor_layers(store, folder), *json_layers(store, folder)])
    (listed,) = ollama_models()
    assert listed.name == "ollama:tiny:latest" and listed.memory_bytes > 0


def test_the_folder_is_rebuilt_when_the_model_is_pulled_again(folder, store, tmp_path):
    """Another manifest (the model pulled or created again) is another folder: never the old
    model's weights under the new name."""
    store.manifest("tiny", [*tensor_layers(store, folder), *json_layers(store, folder)])
    first = resolve("ollama:tiny")
    other = tmp_path / "other"
    build_hf(other, "mistral", seed=1, sliding_window=8)
    shutil.copy(folder / "tokenizer.json", other / "tokenizer.json")
    again = tensor_layers(store, other, together=2)
    store.manifest("tiny", [*again, *json_layers(store, other)])
    second = resolve("ollama:tiny")
    assert second != first
    blobs = {store.root / "blobs" / x["digest"].replace(":", "-") for x in again}
    assert {p.resolve() for p in second.glob("*.safetensors")} == blobs
