"""Mixed-bit conversion: experts at their own bits, read by mlx-lm as by us."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_mixtral.catalog.summary import quantization_of
from mlx_mixtral.convert import convert
from mlx_mixtral.convert.plan import RECIPES, Plan
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.convert.verify import bits_of, verify
from mlx_mixtral.loading import load_model
from mlx_mixtral.model.config import ModelArgs

TINY = dict(model_type="mixtral", vocab_size=256, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
            rope_theta=1e4)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed") / "hf"
    write_hf_checkpoint(folder, ModelArgs.from_dict(TINY), dtype=mx.bfloat16, seed=5)
    return folder


def test_mixed_3_4_loads_in_mlx_lm_with_equal_logits_and_size_by_formula(source, tmp_path):
    out = tmp_path / "m34"
    summary = convert(source, out, recipe="mixed-3-4", progress=False)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    expert = quant["model.layers.0.block_sparse_moe.switch_mlp.gate_proj"]
    assert expert["bits"] == 3 and quant["bits"] == 4  # attention at the default, 4
    assert quant["model.embed_tokens"]["bits"] == 6
    assert quant["model.layers.1.block_sparse_moe.gate"] is False
    formula = Plan(mx.bfloat16, 4, 64, expert_bits=3).estimate_bytes(ModelArgs.from_dict(TINY))
    assert abs(summary.bytes_on_disk / formula - 1) < 0.02
    theirs, _ = mlx_lm_load_model(out)
    theirs.set_dtype(mx.float32)  # ours computes in float32 on the CPU backend
    ours = load_model(out)
    ids = mx.array([[1, 5, 9, 200, 3, 77, 100, 12, 40, 41]])
    np.testing.assert_allclose(np.array(ours(ids)), np.array(theirs(ids)), atol=1e-5, rtol=0)
    assert bits_of(out) == 3
    # The app's model line: every bit width the config gives a layer (3, 4 and 6 here).
    widths = {quant["bits"]} | {v["bits"] for v in quant.values() if isinstance(v, dict)}
    assert quantization_of(ours) == "/".join(map(str, sorted(widths))) + "-bit" == "3/4/6-bit"
    assert quantization_of(load_model(source)) == "float"
    v = verify(source, out)
    assert v.bits == 3 and v.router_agreement is not None and "3-bit" in v.verdict()


def test_expert_bits_alone_imply_quantizing(source, tmp_path):
    convert(source, tmp_path / "e2", expert_bits=2, progress=False)
    quant = json.loads((tmp_path / "e2" / "config.json").read_text())["quantization"]
    assert quant["model.layers.1.block_sparse_moe.switch_mlp.down_proj"]["bits"] == 2
    assert "model.layers.1.self_attn.q_proj" not in quant  # at the default 4 bits


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def test_unknown_recipe_lists_the_recipes(source, tmp_path):
    r = run("convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "x"),
            "--recipe", "mixed-9-9")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert all(name in r.stderr for name in RECIPES)
    assert not (tmp_path / "x").exists()


def test_recipe_and_expert_bits_conflict(source, tmp_path):
    r = run("convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "x"),
            "--recipe", "mixed-3-4", "--expert-bits", "2")
    assert r.returncode == 2 and "--expert-bits" in r.stderr


def test_readme_has_the_size_against_perplexity_table():
    import importlib.util

    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("perplexity", root / "benchmarks" /
                                                  "perplexity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (root / "README.md").read_text()
    table = readme.split("| recipe (SmolLM2")[1].split("\n\n")[0]
    for label, _ in script.RECIPES:
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        ppl = float(row.split("|")[4])
        assert 1 < ppl < 1000
