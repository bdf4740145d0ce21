"""GGUF experts streamed within --max-memory: the block conversion against `mx.load`'s own, and
the paged model against the resident one loaded from the same file."""

from __future__ import annotations

import json
import threading

import gguf
import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf
from mlx_helpers import settled
from test_expert_paging import greedy, greedy_steps
from test_gguf import write_mixtral_gguf

from mlx_mixtral.loading import describe, load
from mlx_mixtral.loading.gguf_quants import affine_tensor
from mlx_mixtral.loading.memory import load_bytes
from mlx_mixtral.loading.memory_plan import OVERHEAD

Q = gguf.GGMLQuantizationType
STREAMED = (Q.Q4_0, Q.Q4_1, Q.Q8_0)
# Experts are most of the bytes, as in Mixtral: wide experts, one KV head.
WIDE = dict(vocab_size=256, hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=1024)
CONTEXT = 512  # the KV reserve: more than any prompt and reply here


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: GGUF path}: every 2-D weight in one streamed type; "mixed": Q4_0 with the output
    in a type MLX cannot read, as llama.cpp writes its Q4_0 files (their Q6_K, which the gguf
    package cannot write: Q5_0 stands in); "per-expert": Q8_0, a tensor per expert."""
    root = tmp_path_factory.mktemp("gguf-streaming")
    ref = build_hf(root / "hf", "mixtral", **WIDE)
    out = {}
    for kind in STREAMED:
        out[kind.name] = root / f"{kind.name}.gguf"
        write_mixtral_gguf(ref, out[kind.name], merged=True, qtype=kind)
    out["mixed"] = root / "mixed.gguf"
    write_mixtral_gguf(ref, out["mixed"], merged=True,
                       qtype=lambda n: Q.Q5_0 if n == "output.weight" else Q.Q4_0)
    out["per-expert"] = root / "per-expert.gguf"  # older files: blk.L.ffn_gate.E.weight
    write_mixtral_gguf(ref, out["per-expert"], merged=False, qtype=Q.Q8_0)
    return out


def half(path) -> int:
    """Half the model, and the process's fixed memory outside MLX that every plan counts
    (memory_plan.OVERHEAD)."""
    return OVERHEAD + int(0.5 * load_bytes(describe(path)))


@pytest.mark.parametrize("kind", STREAMED, ids=lambda k: k.name)
def test_blocks_convert_bit_for_bit_as_mx_load_converts(tmp_path, kind):
    """MLX's own GGUF reader is the oracle: weights, scales and biases equal to the bit, on
    groups of every sign and a group of zeros."""
    rng = np.random.RandomState(0)
    w = (rng.randn(3, 8, 128) * rng.rand(3, 8, 1) * 4 - rng.rand(3, 8, 1)).astype(np.float32)
    w[0, 0, :32] = 0
    raw = gguf.quants.quantize(w, kind)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tensor("x.weight", raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    want = mx.load(str(tmp_path / "t.gguf"))
    for got, name in zip(affine_tensor(raw, kind.name, w.shape), ("weight", "scales", "biases"),
                         strict=True):
        expected = np.array(want[f"x.{name}"])
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name


@pytest.mark.parametrize("kind", STREAMED, ids=lambda k: k.name)
def test_threads_lay_each_expert_into_its_slot_as_the_resident_model_holds_it(
        files, kind, monkeypatch):
    """Every expert of every layer read into a slot, four threads at once, in pieces of an
    odd number of blocks: the slot's arrays equal the resident model's row of that expert, bit
    for bit."""
    from mlx_mixtral.loading.gguf_experts import GGUFExperts

    monkeypatch.setattr("mlx_mixtral.loading.gguf_experts.READ_BYTES", 1000)

    path = files[kind.name]
    resident, _ = load(path, tokenizer=False)
    model, _ = load(path, tokenizer=False, max_memory=half(path), context=CONTEXT)
    pager = model.limits.expert_pager
    pager.close()  # its own loader: reading here instead
    slots = model.limits.memory_plan.slots
    mlps = [layer.block_sparse_moe.switch_mlp for layer in model.layers]
    loader = GGUFExperts(describe(path), mlps, 8, WIDE["intermediate_size"])
    for start in range(0, 8, slots):
        experts = list(range(start, min(start + slots, 8)))
        jobs = [(layer, e, s) for layer in range(len(mlps)) for s, e in enumerate(experts)]
        threads = [threading.Thread(target=lambda part=jobs[i::4]: [loader.load(*j)
                                                                       for j in part])
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for layer, e, s in jobs:
            want = resident.layers[layer].block_sparse_moe.switch_mlp
            got = mlps[layer]
            for proj in ("gate_up_proj", "down_proj"):
                for param in ("weight", "scales", "biases"):
                    a, b = np.array(got[proj][param][s]), np.array(want[proj][param][e])
                    assert np.array_equal(a, b), (layer, e, proj, param)
    loader.close()


@pytest.mark.slow  # 256 tokens resident and paged (~25 s)
def test_q4_0_streams_at_half_its_size_with_the_resident_tokens(files):
    """256 greedy tokens at 50% of the model: the resident model's tokens, MLX's peak
    (loading included) within the budget + 5%, loading read no expert, and experts were read
    from the file while decoding."""
    path = files["Q4_0"]
    prompt = np.random.RandomState(0).randint(0, WIDE["vocab_size"], 32).tolist()
    resident, _ = load(path, tokenizer=False)
    want = greedy(resident, prompt, 256)
    del resident
    base = settled()  # what earlier tests in this process still hold
    budget = half(path)
    model, _ = load(path, tokenizer=False, max_memory=budget, context=CONTEXT)
    plan = model.limits.memory_plan
    assert plan.paging and plan.top_k <= plan.slots < 8
    assert mx.get_peak_memory() - base < plan.resident + plan.slot_bytes + plan.expert, \
        "loading materialised more than the slots: an expert tensor was read whole"
    pager = model.limits.expert_pager
    got, prefilled = [], None
    for token in greedy_steps(model, prompt, 256):
        got.append(token)
        prefilled = prefilled or pager.stats.total()
    peak, stats = mx.get_peak_memory() - base, pager.stats.total()
    pager.close()
    assert got == want
    assert peak <= 1.05 * budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"
    assert stats.reads > prefilled.reads > 0 and stats.hits < stats.needed


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "mixed", "per-expert"])
def test_other_types_and_a_mixed_file_stream_with_the_resident_logits(files, name):
    """Q4_1, Q8_0, a Q4_0 file whose output MLX cannot read (read tensor by tensor, its Q4_0
    experts kept 4-bit as MLX keeps them, not re-quantized), and a file with a tensor per
    expert: prefill chunks and decode steps give the resident logits, 48 greedy tokens its
    tokens, within the budget."""
    path = files[name]
    base = settled()
    resident, _ = load(path, tokenizer=False)
    if name == "mixed":
        assert resident.layers[0].block_sparse_moe.switch_mlp.down_proj.bits == 4
    budget = half(path)
    model, _ = load(path, tokenizer=False, max_memory=budget, context=CONTEXT)
    assert model.limits.memory_plan.paging
    ids = np.random.RandomState(1).randint(0, WIDE["vocab_size"], 40).tolist()
    caches = resident.make_cache(), model.make_cache()
    for start in range(0, 40, 20):
        chunk = mx.array([ids[start:start + 20]])
        want, got = resident(chunk, cache=caches[0]), model(chunk, cache=caches[1])
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    for token in ids[:4]:
        step = mx.array([[token]])
        want, got = resident(step, cache=caches[0]), model(step, cache=caches[1])
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    prompt = ids[:24]
    expected = greedy(resident, prompt, 48)
    del resident, caches
    mx.clear_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    assert greedy(model, prompt, 48) == expected
    assert mx.get_peak_memory() - base <= 1.05 * budget
    model.limits.expert_pager.close()


@pytest.mark.parametrize("dtype", ["bfloat16"])  # (float16 is a plain copy, and 30 s here)
def test_half_precision_slots_hold_what_the_resident_model_holds(files, dtype):
    """With `dtype`, the slots' scales and biases are cast as the resident model casts the
    file's float16 ones (bfloat16: rounded to nearest even): the same logits."""
    path = files["Q4_1"]
    resident, _ = load(path, tokenizer=False, dtype=dtype)
    budget = OVERHEAD + int(0.5 * load_bytes(describe(path), dtype))
    model, _ = load(path, tokenizer=False, dtype=dtype, max_memory=budget, context=CONTEXT)
    assert model.limits.memory_plan.paging
    assert model.layers[0].block_sparse_moe.switch_mlp.down_proj.scales.dtype == \
        getattr(mx, dtype)
    ids = mx.array([np.random.RandomState(3).randint(0, WIDE["vocab_size"], 24).tolist()])
    want, got = resident(ids).astype(mx.float32), model(ids).astype(mx.float32)
    model.limits.expert_pager.close()
    assert np.array_equal(np.array(got), np.array(want))


def test_a_gguf_too_big_for_the_memory_pages_by_itself(files, monkeypatch, capsys):
    """No budget, less memory available than the model needs: its experts stream within what
    is available (one line says so), as a folder's do."""
    from mlx_mixtral.model.expert_cache import PagedMoE

    path = files["Q8_0"]
    monkeypatch.setattr("mlx_mixtral.loading.memory.available_memory", lambda: half(path))
    model, _ = load(path, tokenizer=False)
    model.limits.expert_pager.close()
    assert model.limits.memory_plan.paging and model.limits.memory_plan.budget == half(path)
    assert any(isinstance(m, PagedMoE) for _, m in model.named_modules())
    assert "its experts will be read from disk as chosen" in capsys.readouterr().err


def test_an_ollama_gguf_streams(files, tmp_path, monkeypatch):
    """`ollama:NAME` whose model layer is a GGUF blob streams as the file does."""
    from test_ollama_store import Store

    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    store = Store(tmp_path / "models")
    path = files["Q4_0"]
    store.manifest("tiny", [store.blob(path.read_bytes(), "application/vnd.ollama.image.model")],
                   {"model_format": "gguf"})
    prompt = np.random.RandomState(2).randint(0, WIDE["vocab_size"], 16).tolist()
    resident, _ = load(path, tokenizer=False)
    model, _ = load("ollama:tiny", tokenizer=False, max_memory=half(path), context=CONTEXT)
    assert model.limits.memory_plan.paging
    assert greedy(model, prompt, 16) == greedy(resident, prompt, 16)
    model.limits.expert_pager.close()


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_experts_of_a_type_that_does_not_stream_are_one_line(tmp_path, cli_here, command):
    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    path = tmp_path / "q5_0.gguf"
    write_mixtral_gguf(ref, path, merged=True,
                       qtype=lambda n: Q.Q5_0 if "_exps." in n else Q.Q4_0)
    args = (["generate", "--raw", "--max-tokens", "2", "t1"] if command == "generate"
            else ["bench", "--runs", "1", "--prompt-tokens", "8", "--gen-tokens", "2"])
    r = cli_here(*args, "--model", str(path), "--max-memory", str(half(path)))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mlx-mixtral: error:") and "Traceback" not in r.stderr
    assert "Q5_0" in r.stderr and "mlx-mixtral convert" in r.stderr


def test_bench_max_memory_runs_on_a_gguf(files, cli_here):
    base = settled()
    r = cli_here("bench", "--model", str(files["Q4_0"]), "--max-memory", "50%", "--runs", "1",
                 "--prompt-tokens", "24", "--gen-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)["budgets"][0]
    assert entry["slots"] < 8
    for v in entry["variants"].values():
        assert v["decode_tps"] > 0 and v["peak_memory"] - base <= 1.05 * entry["budget"]


@pytest.mark.slow  # a 256-token generation resident and one paged in a fresh process (~40 s)
def test_q4_0_streams_within_the_budget_as_the_operating_system_counts_it(files):
    """The Q4_0 file at 50% in a fresh process: the resident load's 256 greedy tokens, MLX's
    peak within the budget + 5%, and the process's peak RSS within the budget + its own
    baseline + 10%."""
    from mlx_helpers import assert_within, fresh_paged_run

    path = files["Q4_0"]
    prompt = np.random.RandomState(1).randint(0, WIDE["vocab_size"], 32).tolist()
    resident, _ = load(path, tokenizer=False)
    want = greedy(resident, prompt, 256)
    del resident
    budget = half(path)
    run = fresh_paged_run(path, budget, prompt, context=CONTEXT)
    assert run["slots"] < WIDE["num_local_experts"]
    assert run["tokens"] == want
    assert_within(run, budget)
