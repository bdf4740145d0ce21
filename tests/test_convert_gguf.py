"""`convert` from what users have: a GGUF file (the demo's; a tiny Mixtral written as
llama.cpp's converter writes one) or `ollama:NAME`, into an MLX folder that answers as the GGUF
does, loaded by the GGUF path (MLX's GGUF reader) as the oracle."""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf
from mlx_lm.utils import load_model as mlx_lm_load_model
from test_gguf import PARIS, PARIS_PROMPT, write_mixtral_gguf
from test_ollama_store import Store

from mlx_mixtral.convert import convert
from mlx_mixtral.demo import DEMO_NAME
from mlx_mixtral.loading import describe, load, load_model
from mlx_mixtral.loading.expert_files import expert_extents
from mlx_mixtral.loading.memory_plan import minimum_budget


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full forward passes (no cache: the plain path)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt):]


def greedy_cached(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens decoded with a KV cache (the demo's forward pass takes seconds here)."""
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "mlx"
    convert(DEMO_NAME, out, progress=False)
    return out


def test_the_demo_gguf_converts_to_a_folder_that_answers_as_it_does(demo_folder):
    """Q4_1 and Q8_0 kept bit for bit: the same logits and greedy tokens, and the vocabulary
    carried over (the same ids for text and a chat, the same end of sequence). (~15 s: the
    demo's forward pass takes seconds on this CPU; two models, a prompt and 3 steps each.)"""
    ours, ours_tok = load(demo_folder)
    theirs, theirs_tok = load(DEMO_NAME)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours_tok.apply_chat_template(messages) == theirs_tok.apply_chat_template(messages)
    text = "Héllo, wörld! <|im_end|> 1234"
    assert ours_tok.encode(text) == theirs_tok.encode(text)
    assert (ours_tok.eos_ids, ours_tok.bos_id) == (theirs_tok.eos_ids, theirs_tok.bos_id)
    np.testing.assert_array_equal(logits(ours, PARIS_PROMPT), logits(theirs, PARIS_PROMPT))
    assert greedy_cached(ours, PARIS_PROMPT, 3) == greedy_cached(theirs, PARIS_PROMPT, 3)
    config = json.loads((demo_folder / "config.json").read_text())
    q = config["quantization"]
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}  # Q4_1
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}  # Q8_0


def test_generate_runs_the_converted_demo_as_the_gguf(demo_folder, cli_here):
    argv = ["--prompt", "The capital of France is", "--raw", "--temp", "0", "--max-tokens", "4",
            "--repetition-penalty", "1"]  # the demo's own default is 1.1
    folder = cli_here("generate", "--model", str(demo_folder), *argv)
    gguf_run = cli_here("generate", "--model", DEMO_NAME, *argv)
    assert folder.returncode == gguf_run.returncode == 0, folder.stderr
    assert folder.stdout == gguf_run.stdout and folder.stdout.strip()


def test_mlx_lm_loads_the_converted_demo(demo_folder):
    """mlx-lm (its own loader and transformers' tokenizer) answers " Paris", llama.cpp's top
    token."""
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(str(demo_folder))
    assert tokenizer.encode("The capital of France is") == PARIS_PROMPT
    assert int(mx.argmax(model(mx.array([PARIS_PROMPT]))[0, -1]).item()) == PARIS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Mixtral as a Q4_0 GGUF (per-expert tensors, as older Mixtral GGUFs store them),
    and as a float32 one (stacked experts)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    ref = build_hf(root / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2,
                   intermediate_size=128)
    write_mixtral_gguf(ref, root / "q4_0.gguf", merged=False,
                       qtype=gguf.GGMLQuantizationType.Q4_0)
    write_mixtral_gguf(ref, root / "f32.gguf", merged=True)
    return root, ref


@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
@pytest.mark.parametrize("kind", ["q4_0", "f32"])
def test_a_mixtral_gguf_converts_to_a_folder_equal_to_it(tiny, tmp_path, tokens, layout, kind):
    """Its tensors as they are (float32 ones stay float32: no --dtype asked for)."""
    root, _ = tiny
    convert(root / f"{kind}.gguf", tmp_path / "out", progress=False, layout=layout)
    prompt = tokens(1, 12)[0].tolist()
    gguf_model, folder_model = load_model(root / f"{kind}.gguf"), load_model(tmp_path / "out")
    np.testing.assert_array_equal(logits(folder_model, prompt), logits(gguf_model, prompt))
    assert greedy(folder_model, prompt, 6) == greedy(gguf_model, prompt, 6)
    theirs, _ = mlx_lm_load_model(tmp_path / "out")
    theirs.set_dtype(mx.float32)  # as ours computes on the CPU
    assert np.abs(logits(theirs, prompt) - logits(gguf_model, prompt)).max() <= 1e-4
    if layout == "per-expert":  # one range per expert, and paged as the GGUF answers
        table = expert_extents(describe(tmp_path / "out").files, 2, 4)
        for extents in (x for experts in table for x in experts):
            extents = sorted(extents, key=lambda x: x.offset)
            assert len(extents) == (9 if kind == "q4_0" else 3)
            assert len({x.file for x in extents}) == 1
            assert all(a.offset + a.nbytes == b.offset for a, b in zip(extents[:-1], extents[1:],
                                                                        strict=True))
        budget = minimum_budget(describe(tmp_path / "out"), context=64)
        paged, _ = load(tmp_path / "out", tokenizer=False, max_memory=budget, context=64)
        assert paged.limits.memory_plan.slots < 4
        assert greedy(paged, prompt, 6) == greedy(gguf_model, prompt, 6)


def test_a_type_mlx_lacks_is_dequantized_then_quantized_as_asked(tmp_path, tokens, cli_here):
    """Q5_0: no exact MLX form. Without -q the folder holds the gguf package's dequantized
    values (in float32 here, exactly); with -q they are quantized as asked; one line says so."""
    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2,
                   intermediate_size=128)
    path = tmp_path / "q5.gguf"
    write_mixtral_gguf(ref, path, merged=True, qtype=gguf.GGMLQuantizationType.Q5_0)
    result = cli_here("convert", "--hf-path", str(path), "--mlx-path", str(tmp_path / "f32"),
                      "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "Q5_0" in line]
    assert len(notes) == 1 and "dequantized to float32" in notes[0] and "-q" in notes[0]
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]) for t in gguf.GGUFReader(str(path)).tensors}
    folder = load_model(tmp_path / "f32")
    down = folder.layers[1].block_sparse_moe.switch_mlp.down_proj.weight
    np.testing.assert_array_equal(np.array(down), stored["blk.1.ffn_down_exps.weight"])
    out = folder.model.embed_tokens.weight
    np.testing.assert_array_equal(np.array(out), stored["token_embd.weight"])

    result = cli_here("convert", "--hf-path", str(path), "--mlx-path", str(tmp_path / "q8"),
                      "-q", "--q-bits", "8", "--dtype", "float32")
    assert "quantized to 8 bits" in result.stdout
    q8 = load_model(tmp_path / "q8")
    assert q8.layers[1].block_sparse_moe.switch_mlp.down_proj.bits == 8
    assert q8.layers[1].block_sparse_moe.gate.weight.dtype == mx.float32  # router: never
    prompt = tokens(1, 10)[0].tolist()
    assert greedy(q8, prompt, 4) == greedy(folder, prompt, 4)


def test_ollama_name_converts_its_gguf_blob(tiny, tmp_path, monkeypatch, tokens):
    root, _ = tiny
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    store = Store(tmp_path / "models")
    layer = store.blob((root / "q4_0.gguf").read_bytes(), "application/vnd.ollama.image.model")
    store.manifest("tiny-mixtral", [layer], {"model_format": "gguf"})
    convert("ollama:tiny-mixtral", tmp_path / "out", progress=False)
    prompt = tokens(1, 8)[0].tolist()
    np.testing.assert_array_equal(logits(load_model(tmp_path / "out"), prompt),
                                  logits(load_model(root / "q4_0.gguf"), prompt))


def test_dequantize_turns_a_gguf_into_floats(tiny, tmp_path, tokens):
    """--dequantize: the Q4_0 weights as floats (no quantization left), the same model."""
    root, _ = tiny
    convert(root / "q4_0.gguf", tmp_path / "out", dequantize=True, dtype="float32",
            progress=False)
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())
    prompt = tokens(1, 8)[0].tolist()
    floats, gguf_model = load_model(tmp_path / "out"), load_model(root / "q4_0.gguf")
    assert not hasattr(floats.layers[0].block_sparse_moe.switch_mlp.down_proj, "bits")
    assert np.abs(logits(floats, prompt) - logits(gguf_model, prompt)).max() <= 1e-4


def test_verify_compares_the_folder_with_its_gguf(tiny, tmp_path, cli_here):
    root, _ = tiny
    result = cli_here("convert", "--hf-path", str(root / "q4_0.gguf"), "--mlx-path",
                      str(tmp_path / "out"), "--verify")
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement 100.0%" in result.stdout and "as expected" in result.stdout
