"""`ollama:NAME` for a model Ollama keeps as safetensors layers (`ollama create` from a
safetensors folder, for its MLX engine): a store laid out here as Ollama writes one, then loaded
and compared with the folder it came from (or, quantized by Ollama, with its weights
dequantized), and damaged stores refused in one line.

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
    tensors = {"model.norm.weight": ({"dtype": "U32", "shape": [4]}, bytes(16)),
               "model.norm.weight.scale": ({"dtype": "U8", "shape": [1]}, bytes(1))}
    metadata = ({"quant_type": "int4", "group_size": "many"} if case == "group size a word"
                else {"quant_type": "nvfp4"})
    quantized = store.blob(safetensors_bytes(tensors, metadata), TENSOR, "model.norm.weight")
    store.manifest("tiny", [quantized, *layers])
    if case == "group size a word":
        return "group size 'many' is not a number"
    assert case == "quantized as nvfp4"
    return "quantized by Ollama as nvfp4"


@pytest.mark.parametrize("case", ["not json", "no weights", "digest outside the store",
                                  "blob missing", "no config.json", "file name with a folder",
                                  "truncated tensor blob", "quantized as nvfp4",
                                  "group size a word"])
def test_a_damaged_store_is_refused_in_one_line(case, folder, store, capsys):
    words = damage(case, store, folder)
    line = refusal(["generate", "--model", "ollama:tiny", "--prompt", "t5", "--max-tokens",
                    "1"], capsys)
    assert words in line, line


def ollama_int4(name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(group, bits) `ollama create --quantize int4` gives a tensor (x/create/create.go
    GetTensorQuantization, for these names): 8-bit for lm_head and k/v, 4-bit for the other
    linear weights whose rows split into groups of 64, None for the rest."""
    if (not name.endswith(".weight") or "embed" in name or "norm" in name or len(shape) != 2
            or shape[-1] % 64 or shape[0] * shape[1] < 1024 or ".gate." in name):
        return None
    return 64, 8 if any(p in name for p in ("lm_head", ".k_proj", ".v_proj")) else 4


def experts_8bit(name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """A kind the format allows beside int4 (per-blob metadata): groups of 32, the experts'
    w2 8-bit, so that the stacked layers need a `quantization` entry of their own."""
    if ".experts." not in name and (".self_attn." not in name or len(shape) != 2):
        return None
    return 32, 8 if ".w2." in name else 4


def quantized_store(store: Store, source: Path, plain: Path, kinds) -> None:
    """`source` quantized as Ollama stores it, each tensor a blob; and `plain`, an independent
    oracle: the same folder with those weights dequantized (MLX's own meaning of its kind)."""
    weights: dict = {}
    for path in source.glob("*.safetensors"):
        weights.update(mx.load(str(path)))
    shutil.copytree(source, plain)
    layers, dequantized = json_layers(store, source), {}
    blob = plain.parent / "blob.safetensors"
    for name, w in sorted(weights.items()):
        kind = kinds(name, w.shape)
        if kind is None:
            dequantized[name] = w
            mx.save_safetensors(str(blob), {name: w})
        else:
            group, bits = kind
            q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
            dequantized[name] = mx.dequantize(q, scales, biases, group_size=group, bits=bits)
            mx.save_safetensors(str(blob), {name: q, f"{name}.scale": scales,
                                            f"{name}.bias": biases},
                                metadata={"quant_type": f"int{bits}", "group_size": str(group)})
        layers.append(store.blob(blob.read_bytes(), TENSOR, name))
    mx.save_safetensors(str(plain / "model.safetensors"), dequantized)
    store.manifest("tiny", layers)


@pytest.mark.parametrize("model_type, kinds", [("mistral", ollama_int4),
                                                ("mixtral", experts_8bit)])
def test_a_model_ollama_quantized_answers_as_its_dequantized_weights(
        model_type, kinds, store, tmp_path, capsys, tokens):
    """Quantized as Ollama quantizes (MLX's affine kind under its own names, some layers
    8-bit) against a plain folder of the same weights dequantized."""
    source = tmp_path / "source"
    build_hf(source, model_type, sliding_window=8, **(
        dict(num_local_experts=4, num_experts_per_tok=2) if model_type == "mixtral" else {}))
    tiny_tokenizer().save_pretrained(source)
    quantized_store(store, source, tmp_path / "dequantized", kinds)
    args = ["generate", "--prompt", "t5 t6 t7", "--temp", "0", "--max-tokens", "8"]
    direct = in_process(capsys, *args, "--model", str(tmp_path / "dequantized"))
    pulled = in_process(capsys, *args, "--model", "ollama:tiny")
    assert direct.returncode == pulled.returncode == 0, pulled.stderr
    assert direct.stdout.strip() and pulled.stdout == direct.stdout
    ids = mx.array(tokens(1, 8))
    quantized, _ = mlx_mixtral.load("ollama:tiny", tokenizer=False)
    reference, _ = mlx_mixtral.load(str(tmp_path / "dequantized"), tokenizer=False)
    assert np.abs(np.array(quantized(ids)) - np.array(reference(ids))).max() <= 1e-3
    layer = {"group_size": 32, "bits": 8} if model_type == "mixtral" else {"group_size": 64,
                                                                          "bits": 8}
    config = json.loads((resolve("ollama:tiny") / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and layer in config["quantization"].values()


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


def test_an_ollama_mixtral_pages_its_experts_within_a_budget(store, tmp_path):
    """Its per-expert tensors (linked floats, or rewritten int4) are read into slots from the
    folder's files as from any Hugging Face folder: the resident model's logits."""
    from mlx_mixtral.convert.synthetic import write_hf_checkpoint
    from mlx_mixtral.loading.memory import load_bytes
    from mlx_mixtral.loading.memory_plan import OVERHEAD
    from mlx_mixtral.loading.source import describe
    from mlx_mixtral.model.config import ModelArgs

    args = ModelArgs.from_dict(dict(
        model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e4))
    write_hf_checkpoint(tmp_path / "hf", args, dtype=mx.bfloat16, seed=3)
    quantized_store(store, tmp_path / "hf", tmp_path / "dequantized",
                    lambda name, shape: (32, 4) if ".experts." in name else None)
    resident, _ = mlx_mixtral.load("ollama:tiny", tokenizer=False)
    budget = OVERHEAD + int(0.8 * load_bytes(describe(resolve("ollama:tiny"))))
    model, _ = mlx_mixtral.load("ollama:tiny", tokenizer=False, max_memory=budget, context=64)
    assert model.limits.memory_plan.paging
    ids = mx.array([list(range(1, 40))])
    np.testing.assert_allclose(np.array(model(ids)), np.array(resident(ids)), atol=1e-5,
                               rtol=0)
    model.limits.expert_pager.close()
