"""Writers of tiny model files, and ways to damage them, for the bad-input and fuzz tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

TINY_LLAMA = dict(vocab=300, hidden=64, ff=96, layers=2, heads=4, kv_heads=2)


def write_llama_gguf(path: Path, arch: str = "llama", **meta: Any) -> Path:
    """A tiny dense llama GGUF (float32, random weights, a `llama` vocabulary: control tokens,
    the 256 byte tokens, then words).
    `meta` overrides llama.* metadata values (by GGUF key suffix, e.g. embedding_length)."""
    s = TINY_LLAMA
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    values = {"block_count": s["layers"], "context_length": 256,
              "embedding_length": s["hidden"], "feed_forward_length": s["ff"],
              "attention.head_count": s["heads"], "attention.head_count_kv": s["kv_heads"],
              "vocab_size": s["vocab"], **meta}
    for key, value in values.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("llama")
    words = [f"\u2581w{i}" for i in range(s["vocab"] - 259)]
    writer.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words])
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    h, hd = s["hidden"], s["hidden"] // s["heads"]
    writer.add_tensor("token_embd.weight", w(s["vocab"], h))
    writer.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(s["layers"]):
        b = f"blk.{i}."
        for name, shape in (("attn_norm", (h,)), ("ffn_norm", (h,)),
                            ("attn_q", (s["heads"] * hd, h)), ("attn_k", (s["kv_heads"] * hd, h)),
                            ("attn_v", (s["kv_heads"] * hd, h)), ("attn_output", (h, h)),
                            ("ffn_gate", (s["ff"], h)), ("ffn_up", (s["ff"], h)),
                            ("ffn_down", (h, s["ff"]))):
            writer.add_tensor(f"{b}{name}.weight",
                              np.ones(shape, np.float32) if len(shape) == 1 else w(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch_bytes(path: Path, at: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: Any, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(u64(len(text)) + text + data)
