"""What one rank of several reads and holds, checked in one process (the rank is named, never
joined): a tensor-parallel rank's weights are MLX's own shard of the whole tensors but read
by byte range (half the checkpoint's bytes, counted by the system), and within a budget each
rank's expert slots hold its share of the experts: its slices, or its layers only. Two real
ranks running are in test_distributed.py."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.errors import MemoryLimitError
from mlx_mixtral.loading import build, describe
from mlx_mixtral.loading.memory_plan import OVERHEAD, model_sizes, plan_memory
from mlx_mixtral.loading.rank_loader import RankOf, build_rank, plan_ranks
from mlx_mixtral.loading.rank_slices import part_of, read_part
from mlx_mixtral.model.config import ModelArgs
from mlx_mixtral.model.sharding import shard_layers, shard_tensors

SHAPE = dict(model_type="mixtral", vocab_size=128, hidden_size=256, intermediate_size=512,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024)

# Too small for the whole model in one process; enough for a rank's share, paged.
# Each rank's budget: its share, plus the process's fixed memory outside MLX every plan counts.
BUDGETS = {"hf": OVERHEAD + 11_000_000, "q4": OVERHEAD + 3_200_000}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The same model as a Hugging Face folder (bfloat16, one tensor per expert), an MLX
    float32 folder and an MLX 4-bit folder (its scales in bfloat16)."""
    root = tmp_path_factory.mktemp("rank-shares")
    write_hf_checkpoint(root / "hf", ModelArgs.from_dict(SHAPE), dtype=mx.bfloat16, seed=3)
    convert(root / "hf", root / "f32", dtype="float32", progress=False)
    convert(root / "hf", root / "q4", quantize=True, progress=False)
    return {name: root / name for name in ("hf", "f32", "q4")}


def rchar() -> int:
    """What this process has read through read calls, as the system counts it."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


@pytest.mark.parametrize(("shape", "held"), [((6, 8), (3, 8)), ((6, 8), (6, 4)),
                                             ((4, 6, 10), (4, 3, 10)), ((4, 6, 10), (4, 6, 5)),
                                             ((5, 7), (5, 7))])
def test_a_part_is_numpy_s_split_of_the_stored_tensor(tmp_path, shape, held):
    whole = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * 13 + whole.tobytes())  # not at the file's start
    axis = next((i for i, (a, b) in enumerate(zip(shape, held, strict=True)) if a != b), 0)
    parts = shape[axis] // held[axis]
    fd = os.open(path, os.O_RDONLY)
    try:
        for rank in range(parts):
            part = part_of(shape, 4, held, rank, offset=13)
            got = np.empty(held, np.float32)
            assert read_part(fd, part, memoryview(got).cast("B")) == got.nbytes
            np.testing.assert_array_equal(got, np.split(whole, parts, axis)[rank])
    finally:
        os.close(fd)


def mlx_shard(folder: Path, rank: int) -> dict[str, mx.array]:
    """The oracle: the whole model, split by MLX's own sharding (slicing whole tensors)."""
    model, _ = build(describe(folder), fuse=False)
    shard_tensors(model, RankOf(2, rank))
    model.fuse()
    mx.eval(model.parameters())
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("name", ["hf", "f32", "q4"])
def test_a_tensor_parallel_rank_reads_only_its_slices(folders, name):
    """Each rank's weights equal MLX's shard of the whole tensors, bit for bit, in the same
    dtypes; and loading them read at most 0.55x of the checkpoint's bytes, counted by the
    system (rchar), not only by the reader."""
    source = describe(folders[name])
    stored = sum(p.stat().st_size for p in source.files)
    for rank in (0, 1):
        want = mlx_shard(folders[name], rank)
        before = rchar()
        got = build_rank(source, RankOf(2, rank), pipeline=False)
        read = rchar() - before
        params = dict(tree_flatten(got.model.parameters()))
        assert params.keys() == want.keys()
        for key, value in want.items():
            assert params[key].dtype == value.dtype, key
            assert mx.array_equal(params[key], value).item(), key
        assert read <= 0.55 * stored, (rank, read / stored)
        assert got.bytes_read <= read


def test_a_rank_s_plan_is_for_its_share(folders):
    """Within a budget too small for one process, each of two ranks plans for its share: a
    pipeline rank for its layers only, a tensor-parallel rank for half of every expert; and
    the ranks agree on what changes the output (the prefill chunk, the context)."""
    source = describe(folders["q4"])
    resident, experts = model_sizes(source)
    expert = experts // (SHAPE["num_hidden_layers"] * SHAPE["num_local_experts"])
    with pytest.raises(MemoryLimitError):
        plan_memory(source, BUDGETS["q4"], context=256)
    tensor = [plan_ranks(source, BUDGETS["q4"], 2, r, False, context=256) for r in (0, 1)]
    pipeline = [plan_ranks(source, BUDGETS["q4"], 2, r, True, context=256) for r in (0, 1)]
    assert all(p.layers == 2 and p.expert == expert for p in pipeline)
    assert all(p.layers == 4 and abs(p.expert - expert / 2) <= 64 for p in tensor)
    assert all(p.resident < resident for p in tensor + pipeline)
    for plans in (tensor, pipeline):
        assert len({(p.prefill_step, p.context_limit) for p in plans}) == 1
        assert all(p.paging and p.slots >= p.top_k for p in plans)


@pytest.mark.parametrize("name", ["hf", "q4"])
@pytest.mark.parametrize("pipeline", [False, True])
def test_a_rank_s_slots_hold_its_share_of_the_experts(folders, name, pipeline):
    """Paged, rank 1's slot holds exactly what the resident rank 1 holds for that expert: a
    pipeline rank pages its own layers (2 and 3) alone, a tensor-parallel rank its slices."""
    source = describe(folders[name])
    rank = RankOf(2, 1)
    plan = plan_ranks(source, BUDGETS[name], 2, 1, pipeline, context=256)
    assert plan.paging
    paged = build_rank(source, rank, pipeline, memory=plan)
    resident, _ = build(source, fuse=False)
    if pipeline:
        shard_layers(resident.model, rank)
    else:
        shard_tensors(resident, rank)
    resident.fuse()
    assert len(paged.pager.slots) == len(resident.layers) == (2 if pipeline else 4)
    for layer, (ours, theirs) in enumerate(zip(paged.model.layers, resident.layers,
                                               strict=True)):
        for expert in (0, 3):
            paged.pager.loader.load(layer, expert, 1)
            slot = dict(tree_flatten(ours.block_sparse_moe.switch_mlp.parameters()))
            want = dict(tree_flatten(theirs.block_sparse_moe.switch_mlp.parameters()))
            assert slot.keys() == want.keys()
            for key, value in want.items():
                assert mx.array_equal(slot[key][1], value[expert]).item(), (layer, expert, key)
    paged.pager.close()


def test_a_budget_one_rank_cannot_run_in_is_refused_for_every_rank(folders):
    """Pipeline rank 0 (its layers, plus the embeddings both hold) is asked for the plan of
    every rank: too small a budget is one line naming the per-rank minimum, on every rank."""
    source = describe(folders["q4"])
    lines = set()
    for rank in (0, 1):
        with pytest.raises(MemoryLimitError) as e:
            plan_ranks(source, OVERHEAD + 1_000_000, 2, rank, True, context=256)
        lines.add(str(e.value))
    assert len(lines) == 1 and "each rank's budget" in lines.pop()


def test_bench_under_mlx_launch_takes_one_budget(cli_here, monkeypatch, folders):
    """Each rank's budget is one size: a list (one process's sweep) is one line, exit 2,
    before any rank joins the group."""
    monkeypatch.setenv("MLX_RANK", "0")
    result = cli_here("bench", "--model", str(folders["q4"]), "--max-memory", "50%,75%")
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "mlx-mixtral: error: under mlx.launch, bench --max-memory takes one budget (each "
        "rank's), not a list"]
