"""Expert paging within --max-memory, against the fully resident model as the oracle."""

from __future__ import annotations

import json
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest
from conftest import Numbers
from mlx_lm.generate import generate_step

from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.loading import describe, load
from mlx_mixtral.loading.memory import folder_tensor_bytes, load_bytes
from mlx_mixtral.loading.memory_plan import OVERHEAD
from mlx_mixtral.model.config import ModelArgs
from mlx_mixtral.model.expert_cache import ExpertSlots, PagedMoE
from mlx_mixtral.model.moe import SparseMoE

# Experts are over 85% of the bytes, as in Mixtral (97%): wide experts, one KV head.
WIDE = dict(model_type="mixtral", vocab_size=512, hidden_size=256, intermediate_size=2048,
            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
            rope_theta=1e4)
CONTEXT = 1024  # the KV reserve: more than any prompt and reply here


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    write_hf_checkpoint(root / "hf", ModelArgs.from_dict(WIDE), dtype=mx.bfloat16)
    convert(root / "hf", root / "q4", quantize=True, q_bits=4, progress=False)
    return root


def model_bytes(path) -> int:
    return load_bytes(describe(path))


def share_budget(share: float, path) -> int:
    """`share` of the model's size, plus the process's own memory outside MLX that every plan
    counts (memory_plan.OVERHEAD): the share is what the model gets."""
    return OVERHEAD + int(share * model_bytes(path))


def greedy_steps(model, prompt: list[int], n: int) -> Iterator[int]:
    from mlx_mixtral.generation.stream import prefill_chunk

    steps = generate_step(mx.array(prompt), model, max_tokens=n,
                          prefill_step_size=prefill_chunk(model, 512))
    return (int(t) for t, _ in steps)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    return list(greedy_steps(model, prompt, n))


def test_experts_are_most_of_the_model(folder):
    source = describe(folder / "q4")
    sizes = folder_tensor_bytes(source, None)
    experts = sum(b for t, b in zip(source.tensors, sizes, strict=True)
                  if ".switch_mlp." in t.name)
    assert experts / sum(sizes) >= 0.85


def test_40_percent_budget_same_tokens_within_budget(folder):
    """128-token prefill and 64 greedy tokens: the resident model's tokens, and MLX's peak
    memory (loading included) within the budget + 5%; experts were read from disk while
    decoding, not only in the prefill (fewer slots than experts, and misses)."""
    prompt = np.random.RandomState(0).randint(0, WIDE["vocab_size"], 128).tolist()
    resident, _ = load(folder / "q4", tokenizer=False)
    want = greedy(resident, prompt, 64)
    del resident
    mx.clear_cache()
    budget = share_budget(0.4, folder / "q4")
    mx.synchronize()
    mx.reset_peak_memory()
    model, _ = load(folder / "q4", tokenizer=False, max_memory=budget, context=CONTEXT)
    plan = model.limits.memory_plan
    assert plan.paging and plan.top_k <= plan.slots < 8
    assert mx.get_peak_memory() < plan.resident + plan.slot_bytes + plan.expert, \
        "loading materialised more than the slots: the stacked expert table was read"
    pager = model.limits.expert_pager
    got, prefilled = [], None
    for token in greedy_steps(model, prompt, 64):
        got.append(token)
        prefilled = prefilled or pager.stats.total()  # after the prefill and the first token
    peak = mx.get_peak_memory()
    stats = pager.stats.total()
    pager.close()
    assert got == want
    assert peak <= 1.05 * budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"
    assert stats.reads > prefilled.reads > 0 and stats.hits < stats.needed  # it did stream


def test_logits_match_resident(folder):
    ids = np.random.RandomState(1).randint(0, WIDE["vocab_size"], 96).tolist()
    resident, _ = load(folder / "q4", tokenizer=False)
    budget = share_budget(0.4, folder / "q4")
    model, _ = load(folder / "q4", tokenizer=False, max_memory=budget, context=CONTEXT)
    caches = resident.make_cache(), model.make_cache()
    for start in range(0, len(ids), 32):  # prefill chunks (more experts than slots) ...
        chunk = mx.array([ids[start:start + 32]])
        want, got = resident(chunk, cache=caches[0]), model(chunk, cache=caches[1])
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    for token in ids[:8]:  # ... and decode steps (fewer)
        step = mx.array([[token]])
        want, got = resident(step, cache=caches[0]), model(step, cache=caches[1])
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    model.limits.expert_pager.close()


def test_the_budget_caps_the_context_and_a_reply_stops_there(folder):
    """Past the reserved tokens the KV cache would outgrow the budget: the context is capped
    where it still fits, a longer prompt is refused in one line, and a reply that
    reaches the cap stops there within the budget."""
    from mlx_mixtral.errors import GenerationError
    from mlx_mixtral.generation.sampling import SamplingParams
    from mlx_mixtral.generation.stream import check_prompt, context_length, stream_generate
    from mlx_mixtral.loading.memory_plan import minimum_budget

    # The least budget that reserves 128 tokens (a short prompt reaches the cap quickly).
    budget = minimum_budget(describe(folder / "q4"), context=128)
    model, _ = load(folder / "q4", tokenizer=False, max_memory=budget, context=128)
    limit = context_length(model)
    assert 128 <= limit == model.limits.memory_plan.context_limit < WIDE["max_position_embeddings"]
    assert f"a context of {limit:,} tokens" in str(model.limits.memory_plan)
    with pytest.raises(GenerationError, match="fits the memory budget is"):
        check_prompt(model, [1] * limit)
    prompt = np.random.RandomState(2).randint(0, WIDE["vocab_size"], limit - 8).tolist()
    mx.synchronize()
    mx.reset_peak_memory()
    *_, stats = stream_generate(model, Numbers(), prompt, max_tokens=64,
                                sampling=SamplingParams(temperature=0))
    peak = mx.get_peak_memory()
    model.limits.expert_pager.close()
    assert stats.finish_reason == "length" and len(stats.tokens) == 8
    assert peak <= 1.05 * budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"


def test_one_sync_per_layer_and_each_expert_read_once_per_chunk(folder, monkeypatch):
    budget = share_budget(0.4, folder / "q4")
    model, _ = load(folder / "q4", tokenizer=False, max_memory=budget, context=CONTEXT,
                    prefetch=False)
    pager = model.limits.expert_pager
    cache = model.make_cache()
    chunk = mx.array([np.random.RandomState(2).randint(0, 512, 48).tolist()])
    mx.eval(model(chunk, cache=cache))
    for layer, stats in enumerate(pager.stats.layers):
        # every expert needed by the chunk was read once: no more reads than experts needed
        assert stats.reads == stats.needed - stats.hits <= 8, layer
    evals = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (evals.append(1), real_eval(*a)))
    logits = model(mx.array([[7]]), cache=cache)
    assert len(evals) == WIDE["num_hidden_layers"]  # one sync per MoE layer
    monkeypatch.undo()
    mx.eval(logits)
    pager.close()


def test_whole_model_within_budget_changes_nothing(folder):
    model, _ = load(folder / "q4", tokenizer=False, max_memory="24GB")
    assert not model.limits.memory_plan.paging
    assert model.limits.expert_pager is None
    assert all(type(layer.block_sparse_moe) is SparseMoE for layer in model.layers)
    assert not any(isinstance(m, PagedMoE) for _, m in model.named_modules())


def test_float_checkpoint_pages_its_per_expert_tensors(tmp_path):
    """A Hugging Face folder: bfloat16 `experts.E.wN` tensors read into float32 slots."""
    args = ModelArgs.from_dict({**WIDE, "hidden_size": 64, "intermediate_size": 256,
                                "num_hidden_layers": 3, "vocab_size": 128})
    write_hf_checkpoint(tmp_path / "hf", args, dtype=mx.bfloat16, seed=3)
    resident, _ = load(tmp_path / "hf", tokenizer=False)
    budget = share_budget(0.6, tmp_path / "hf")
    model, _ = load(tmp_path / "hf", tokenizer=False, max_memory=budget, context=64)
    assert model.limits.memory_plan.paging
    ids = mx.array([list(range(1, 40))])
    np.testing.assert_allclose(np.array(model(ids)), np.array(resident(ids)), atol=1e-5,
                               rtol=0)
    model.limits.expert_pager.close()


def test_slots_evict_least_recently_or_least_often_used():
    lru = ExpertSlots(8, 3, "lru")
    assert lru.place([0, 1, 2]) == [(0, 0), (1, 1), (2, 2)]
    lru.touch([0, 1, 2])
    lru.touch([0])
    assert lru.place([5]) == [(5, 1)]  # 1 was used longest ago
    lfu = ExpertSlots(8, 2, "lfu")
    lfu.place([3, 4])
    lfu.touch([3, 4, 3, 3])
    lfu.touch([4])
    assert lfu.place([6]) == [(6, 1)]  # 4 was used least often, though most recently
    assert lfu.place([7], keep={6}) == [(7, 0)]
    with pytest.raises(ValueError, match="lru, lfu"):
        ExpertSlots(8, 2, "fifo")


@pytest.mark.slow  # runs the paged model at its minimum budget (~15 s)
def test_budget_too_small_says_the_minimum_and_it_works(folder, cli_here):
    r = cli_here("generate", "--model", str(folder / "q4"), "--max-memory", "2MB", "--raw",
                "--max-tokens", "2", "t1 t2")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mlx-mixtral: error:"), r.stderr
    assert "too small" in r.stderr
    minimum = r.stderr.split("give --max-memory ")[1].split()[0]
    prompt = np.random.RandomState(1).randint(0, WIDE["vocab_size"], 32).tolist()
    resident, _ = load(folder / "q4", tokenizer=False)
    want = greedy(resident, prompt, 6)
    del resident
    mx.clear_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    model, _ = load(folder / "q4", tokenizer=False, max_memory=minimum)
    assert model.limits.memory_plan.slots == 2  # top-k experts per layer: the least that runs
    got = greedy(model, prompt, 6)  # it works: the resident model's tokens, within the budget
    peak, budget = mx.get_peak_memory(), model.limits.memory_plan.budget
    model.limits.expert_pager.close()
    assert got == want
    assert peak <= 1.05 * budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"


@pytest.mark.parametrize("value", ["lots", "0GB", "-3GB", "12 parsecs"])
def test_a_budget_that_is_not_a_size_is_one_line(folder, value, cli_here):
    r = cli_here("generate", "--model", str(folder / "q4"), f"--max-memory={value}", "hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--max-memory" in r.stderr and "Traceback" not in r.stderr


def test_info_plans_for_a_smaller_mac(cli_here):
    from mlx_mixtral.cli.info import info

    text = info(preset_name="mixtral-8x7b", memory=16 * 10**9)
    rows = {line.split()[0]: line for line in text.split("memory: 16.0 GB")[1].splitlines()[2:]}
    assert "no" in rows["float16"]
    assert "paging" in rows["4-bit"] and "read per token" in rows["4-bit"]
    # 15.1 GB of weights: under 16 GB, but not with the KV cache and working memory as well
    assert "paging: 7 of 8 experts" in rows["mixed-2-4"]
    r = cli_here("info", "--preset", "mixtral-8x7b", "--memory", "sixteen")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_info_is_the_same_with_or_without_a_measurement_here(monkeypatch, tmp_path):
    """The plans use the default hit rates, so the same files give the same info on every
    machine; a hit rate `bench` measured here adds one line, labelled, naming its file."""
    from mlx_mixtral.cli.bench_paging import hit_rates_path
    from mlx_mixtral.cli.info import info
    from mlx_mixtral.user_files import write_json

    monkeypatch.setenv("MLX_MIXTRAL_DATA_DIR", str(tmp_path))
    plain = info(preset_name="mixtral-8x7b", memory=16 * 10**9).splitlines()
    write_json(hit_rates_path(), {"model": "mixtral-tiny", "hit_rates": {"2/8": 0.99,
                                                                         "4/8": 0.98}})
    measured = info(preset_name="mixtral-8x7b", memory=16 * 10**9).splitlines()
    assert measured[:len(plain)] == plain and "hit rates: defaults" in plain[-1]
    (extra,) = measured[len(plain):]
    assert extra.startswith("  measured here by bench --max-memory on mixtral-tiny: 99% with "
                            "2/8 experts, 98% with 4/8 experts")
    assert str(hit_rates_path()) in extra


def test_bench_with_no_budget_that_runs_is_one_line_before_any_run(folder, cli_here,
                                                                    monkeypatch):
    """Every budget too small: the first one's refusal (flags, not Python names), exit 2, and
    the resident model never loaded (it may not fit at all: the reason for a budget)."""
    from mlx_mixtral.cli import bench

    def no_resident(*a, **k):
        raise AssertionError("the resident model was loaded")

    monkeypatch.setattr(bench, "load_ours", no_resident)
    r = cli_here("bench", "--model", str(folder / "q4"), "--max-memory", "1%,2%", "--runs",
                 "1", "--prompt-tokens", "8", "--gen-tokens", "2")
    assert r.returncode == 2
    assert r.stderr.startswith("mlx-mixtral: error: --max-memory ") and "too small" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_of_a_model_larger_than_the_memory_runs_only_its_budgets(folder, cli_here,
                                                                        monkeypatch):
    """The case budgets are for (Mixtral 8x7B on a 16 GB Mac): the model does not fit the
    memory available, so the resident run is left out, said so, and the budget still runs;
    nothing tries to load the whole model."""
    from mlx_mixtral.cli import bench
    from mlx_mixtral.loading import memory

    def no_resident(*a, **k):
        raise AssertionError("the resident model was loaded")

    monkeypatch.setattr(bench, "load_ours", no_resident)
    monkeypatch.setattr(memory, "available_memory",
                        lambda: load_bytes(describe(folder / "q4")) // 2)
    args = ("bench", "--model", str(folder / "q4"), "--max-memory",
            str(share_budget(0.5, folder / "q4")), "--runs", "1", "--prompt-tokens", "16",
            "--gen-tokens", "4")
    r = cli_here(*args, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["resident"] is None and "not run" in result["resident_note"]
    assert result["budgets"][0]["variants"]["lru+prefetch"]["decode_tps"] > 0
    text = cli_here(*args)
    assert text.returncode == 0 and "fully resident: not run: the model needs" in text.stdout


def test_bench_reports_paging_next_to_resident(folder, cli_here):
    r = cli_here("bench", "--model", str(folder / "q4"), "--max-memory",
                 str(share_budget(0.5, folder / "q4")), "--runs", "1",
                "--prompt-tokens", "24", "--gen-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    entry = result["budgets"][0]
    assert entry["slots"] < 8
    assert set(entry["variants"]) == {"lru+prefetch", "lru", "lfu+prefetch"}
    for v in entry["variants"].values():
        assert len(v["decode_hit_rates"]) == WIDE["num_hidden_layers"]
        assert v["decode_tps"] > 0 and v["bytes_per_token"] >= 0
        assert v["peak_memory"] <= 1.05 * entry["budget"]
    reads = entry["reads"]["runs"]  # the reads before the pool and the pool's, cold and warm
    assert set(reads) == {"serial cold", "serial warm", "pool cold", "pool warm"}
    assert all(v["decode_tps"] > 0 and v["read_gbps"] > 0 for v in reads.values())
    if entry["reads"]["dropped"] and reads["pool cold"]["disk_bytes_per_token"] >= 0:
        # cold runs read from storage, warm ones from memory
        assert reads["pool cold"]["disk_bytes_per_token"] > reads["pool warm"][
            "disk_bytes_per_token"]
    assert entry["peak_rss"] is None or entry["peak_rss"] > 0


def test_a_mixtral_too_big_for_the_memory_pages_by_itself(folder, monkeypatch, capsys):
    """No --max-memory, less memory available than the model needs: the CLI plans within the
    available memory, says so, and `list` says "pages"; with less than paging needs, the
    one-line error names that minimum."""
    from mlx_mixtral.catalog.local import _described
    from mlx_mixtral.cli.listing import fit_word
    from mlx_mixtral.cli.main import load_model_for_cli
    from mlx_mixtral.errors import MemoryLimitError

    path = folder / "q4"
    half = share_budget(0.5, path)
    monkeypatch.setattr("mlx_mixtral.loading.memory.available_memory", lambda: half)
    # (the folder has no tokenizer, which the plan would refuse and the load would not find)
    monkeypatch.setattr("mlx_mixtral.loading.load_plan.require_vocabulary", lambda _: None)
    monkeypatch.setattr("mlx_mixtral.loading.loader.load_tokenizer", lambda *_: None)
    model, _ = load_model_for_cli(str(path))
    model.limits.expert_pager.close()
    assert model.limits.memory_plan.paging and model.limits.memory_plan.budget == half
    from mlx_mixtral.units import size

    assert (f"q4 is larger than the {size(half)} of memory available: its experts will be "
            "read from disk as chosen (--max-memory sets the budget, --force loads it whole)\n"
            ) in capsys.readouterr().err
    listed = _described(str(path), path, "local")
    assert fit_word(listed, half) == "pages" and fit_word(listed, 2 * half + 10**6) == "yes"
    monkeypatch.setattr("mlx_mixtral.loading.memory.available_memory", lambda: 10**6)
    with pytest.raises(MemoryLimitError, match="page its experts from disk .that needs at "):
        load_model_for_cli(str(path))
    assert fit_word(listed, 10**6) == "no"


def test_load_pages_a_mixtral_too_big_for_the_memory_by_itself(folder, monkeypatch, capsys):
    """The library's behaviour, not a front end's: `load` plans within the memory available,
    says so in one line on stderr, and caps the model's context and prefill chunks to the plan;
    with `page_experts=False` it refuses instead."""
    from mlx_mixtral.errors import MemoryLimitError
    from mlx_mixtral.generation.stream import context_length, prefill_chunk
    from mlx_mixtral.units import size

    path = folder / "q4"
    half = share_budget(0.5, path)
    monkeypatch.setattr("mlx_mixtral.loading.memory.available_memory", lambda: half)
    model, _ = load(path, tokenizer=False)
    limits = model.limits
    limits.expert_pager.close()
    plan = limits.memory_plan
    assert plan.paging and plan.budget == half
    assert any(isinstance(m, PagedMoE) for _, m in model.named_modules())
    assert context_length(model) == plan.context_limit < WIDE["max_position_embeddings"]
    assert prefill_chunk(model, 4096) == plan.prefill_step
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"q4 is larger than the {size(half)} of memory available: its "
                          "experts will be read from disk as chosen ("), err
    with pytest.raises(MemoryLimitError, match="the model needs about"):
        load(path, tokenizer=False, page_experts=False)


def test_a_batched_pass_reads_the_union_of_its_experts_once_per_layer(folder, monkeypatch):
    """Four sequences decoding together on the scheduler (packed passes): in each pass every
    layer reads each expert its tokens chose at most once (counted at the loader), and each
    sequence gets the resident model's tokens."""
    from conftest import Numbers

    from mlx_mixtral.generation.sampling import SamplingParams
    from mlx_mixtral.generation.scheduler import Request, Scheduler
    from mlx_mixtral.generation.stats import Stats
    from mlx_mixtral.model.decoder import Model

    prompts = [np.random.RandomState(s).randint(0, WIDE["vocab_size"], 8 + s).tolist()
               for s in range(4)]
    resident, _ = load(folder / "q4", tokenizer=False)
    want = [greedy(resident, p, 12) for p in prompts]
    del resident
    model, _ = load(folder / "q4", tokenizer=False,
                    max_memory=share_budget(0.4, folder / "q4"), context=CONTEXT)
    pager = model.limits.expert_pager
    pager.set_policy("lru", prefetch=False)  # every read is the pass's own
    passes: list[list[tuple[int, int]]] = []
    read = pager._read  # a layer's misses, read together
    monkeypatch.setattr(pager, "_read", lambda layer, reads: (
        passes[-1].extend((layer, e) for e, _ in reads), read(layer, reads))[1])
    call = Model.__call__
    monkeypatch.setattr(Model, "__call__", lambda *a, **k: (passes.append([]),
                                                            call(*a, **k))[1])

    scheduler = Scheduler(model, Numbers(), prefill_step=64)
    got: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        scheduler.add(Request(p, SamplingParams(temperature=0, max_tokens=12),
                              lambda item, i=i: got.__setitem__(i, item.tokens)
                              if isinstance(item, Stats) else None))
    while scheduler.step():
        pass
    pager.close()
    assert [got[i] for i in range(4)] == want
    assert sum(map(len, passes[1:])) > 0  # the decoding passes did page
    assert all(len(reads) == len(set(reads)) for reads in passes), \
        "an expert was read twice in one pass"
