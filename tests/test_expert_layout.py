"""`convert --layout per-expert`: one byte range per expert, and the stacked layout's model
(ours resident and paged, and mlx-lm's) from it."""

from __future__ import annotations

import json
from itertools import pairwise

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.loading import describe, load, load_model
from mlx_mixtral.loading.expert_files import expert_extents
from mlx_mixtral.loading.memory_plan import minimum_budget
from mlx_mixtral.model.config import ModelArgs

TINY = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
            rope_theta=1e4)
PROMPT = np.random.RandomState(3).randint(0, TINY["vocab_size"], 12).tolist()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same checkpoint converted to 4 bits in both layouts (small shards: several files),
    and in float16 per expert (weights without scales)."""
    root = tmp_path_factory.mktemp("layouts")
    write_hf_checkpoint(root / "hf", ModelArgs.from_dict(TINY), dtype=mx.bfloat16)
    for layout in ("stacked", "per-expert"):
        convert(root / "hf", root / layout, quantize=True, q_bits=4, shard_bytes=60_000,
                progress=False, layout=layout)
    convert(root / "hf", root / "f16-per-expert", dtype="float16", shard_bytes=60_000,
            progress=False, layout="per-expert")
    return root


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens by full forward passes (no cache: the plain path), and the first
    step's logits."""
    ids = list(prompt)
    first = None
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
        first = np.array(logits) if first is None else first
        ids.append(int(mx.argmax(logits).item()))
    return ids[len(prompt):], first


def test_each_expert_is_one_contiguous_range(folders):
    """Every expert's nine ranges (gate, up, down x weight, scales, biases) lie end to end in
    one file; the stacked layout, for contrast, spreads them."""
    for layout, contiguous in (("per-expert", True), ("stacked", False),
                               ("f16-per-expert", True)):
        source = describe(folders / layout)
        table = expert_extents(source.files, TINY["num_hidden_layers"],
                               TINY["num_local_experts"])
        runs = []
        for experts in table:
            for extents in experts:
                extents = sorted(extents, key=lambda x: (x.file, x.offset))
                assert len(extents) == (9 if "f16" not in layout else 3)
                runs.append(len({x.file for x in extents}) == 1 and all(
                    a.offset + a.nbytes == b.offset for a, b in pairwise(extents)))
        assert all(runs) if contiguous else not any(runs), layout
    assert len(describe(folders / "per-expert").files) > 1  # shards did not split an expert


def test_per_expert_names_are_hugging_face_s_in_gate_up_down_order(folders):
    index = json.loads((folders / "per-expert" / "model.safetensors.index.json").read_text())
    assert not any(".switch_mlp." in k for k in index["weight_map"])
    names = [t.name for t in describe(folders / "per-expert").tensors
             if ".experts.1." in t.name and ".layers.0." in t.name]
    assert [n.split(".experts.1.")[1] for n in names] == [
        f"{w}.{p}" for w in ("w1", "w3", "w2") for p in ("weight", "scales", "biases")]
    config = json.loads((folders / "per-expert" / "config.json").read_text())
    stacked = json.loads((folders / "stacked" / "config.json").read_text())
    assert config["quantization"] == stacked["quantization"]


def test_per_expert_gives_the_stacked_layouts_tokens_and_logits(folders):
    want, want_logits = greedy(load_model(folders / "stacked"), PROMPT, 8)
    got, got_logits = greedy(load_model(folders / "per-expert"), PROMPT, 8)
    assert got == want
    np.testing.assert_array_equal(got_logits, want_logits)


def test_mlx_lm_loads_the_expert_layout(folders):
    """mlx-lm's sanitize stacks per-expert weights, scales and biases: its model from the
    per-expert folder is its model from the stacked one."""
    theirs_per_expert, _ = mlx_lm_load_model(folders / "per-expert")
    theirs_stacked, _ = mlx_lm_load_model(folders / "stacked")
    assert greedy(theirs_per_expert, PROMPT, 8)[0] == greedy(theirs_stacked, PROMPT, 8)[0]
    ids = mx.array([PROMPT])

    def logits(model) -> np.ndarray:
        return np.array(model(ids).astype(mx.float32))

    np.testing.assert_array_equal(logits(theirs_per_expert), logits(theirs_stacked))
    theirs_f32, _ = mlx_lm_load_model(folders / "per-expert")
    theirs_f32.set_dtype(mx.float32)  # as ours computes on the CPU
    ours = logits(load_model(folders / "stacked"))
    assert np.abs(logits(theirs_f32) - ours).max() <= 1e-4


def test_expert_layout_pages_with_the_resident_models_tokens(folders):
    """Paged from the per-expert folder (2 of 4 experts per layer in memory): the stacked
    folder's resident tokens."""
    want, _ = greedy(load_model(folders / "stacked"), PROMPT, 8)
    budget = minimum_budget(describe(folders / "per-expert"), context=64)  # the fewest slots
    model, _ = load(folders / "per-expert", tokenizer=False, max_memory=budget, context=64)
    plan = model.limits.memory_plan
    assert plan.paging and plan.slots < TINY["num_local_experts"]
    assert greedy(model, PROMPT, 8)[0] == want
    assert model.limits.expert_pager.stats.total().bytes_read  # experts were read


def test_unknown_layout_is_refused(folders, tmp_path, cli_here):
    result = cli_here("convert", "--hf-path", str(folders / "hf"), "--mlx-path",
                      str(tmp_path / "x"), "--layout", "diagonal")
    assert result.returncode == 2 and "--layout" in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_quantized_folder_is_rewritten_per_expert_as_it_is(folders, tmp_path, cli_here):
    """An MLX folder already quantized (mlx-community's, or ours stacked): --layout per-expert
    without -q rewrites its experts, nothing requantized: the stacked folder's logits exactly.
    The stacked layout still asks for --dequantize, and names the way out."""
    out = tmp_path / "rewritten"
    result = cli_here("convert", "--hf-path", str(folders / "stacked"), "--mlx-path", str(out),
                      "--layout", "per-expert")
    assert result.returncode == 0, result.stderr
    _, want = greedy(load_model(folders / "stacked"), PROMPT, 1)
    _, got = greedy(load_model(out), PROMPT, 1)
    np.testing.assert_array_equal(got, want)
    assert not any(".switch_mlp." in t.name for t in describe(out).tensors)
    refused = cli_here("convert", "--hf-path", str(folders / "stacked"), "--mlx-path",
                       str(tmp_path / "again"))
    assert refused.returncode == 2 and "--layout per-expert" in refused.stderr


@pytest.mark.slow  # a 256-token generation resident and one paged in a fresh process (~60 s)
def test_the_expert_layout_streams_256_resident_tokens_within_the_budget_as_rss(tmp_path):
    """The per-expert folder of a Mixtral whose experts are most of its bytes, at 50%: the
    stacked folder's resident 256 greedy tokens (mlx-lm's generate_step as the decoder), MLX's
    peak within the budget + 5%, the process's peak RSS within the budget + its own baseline
    + 10%."""
    from mlx_helpers import assert_within, fresh_paged_run
    from mlx_lm.generate import generate_step
    from test_expert_reads import FAT

    from mlx_mixtral.cli.bench_paging import share_budget
    from mlx_mixtral.loading.memory import load_bytes

    write_hf_checkpoint(tmp_path / "hf", ModelArgs.from_dict(FAT), dtype=mx.bfloat16, seed=7)
    for layout in ("stacked", "per-expert"):
        convert(tmp_path / "hf", tmp_path / layout, quantize=True, q_bits=4, progress=False,
                layout=layout)
    prompt = np.random.RandomState(4).randint(0, FAT["vocab_size"], 24).tolist()
    resident = load_model(tmp_path / "stacked")
    want = [int(t) for t, _ in generate_step(mx.array(prompt), resident, max_tokens=256)]
    budget = share_budget(0.5, load_bytes(describe(tmp_path / "per-expert")))
    run = fresh_paged_run(tmp_path / "per-expert", budget, prompt)
    assert run["slots"] < FAT["num_local_experts"]
    assert run["tokens"] == want
    assert_within(run, budget)
