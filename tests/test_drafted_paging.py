"""Drafted decoding within --max-memory: the resident model's plain greedy tokens as the
oracle, the draft model counted inside the budget, and a verify pass reading the union of its
tokens' experts once per layer."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import Numbers
from mlx_helpers import settled

from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.errors import GenerationError
from mlx_mixtral.generation import Stats, stream_generate
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.speculative import LookupDrafter, ModelDrafter
from mlx_mixtral.loading import describe, draft_needs, load
from mlx_mixtral.loading.memory import load_bytes
from mlx_mixtral.loading.memory_plan import OVERHEAD
from mlx_mixtral.model.config import ModelArgs

# The expert paging tests' model: experts over 85% of the bytes, as in Mixtral.
WIDE = dict(model_type="mixtral", vocab_size=512, hidden_size=256, intermediate_size=2048,
            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
            rope_theta=1e4)
# A dense draft of the same vocabulary, about a slot per layer's worth of bytes (8.7 MB as
# float32): left out of the plan, the model would take one more slot and overrun the budget.
DRAFT = dict(model_type="mistral", vocab_size=512, hidden_size=256, intermediate_size=1024,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             max_position_embeddings=4096, rope_theta=1e4)
CONTEXT = 256  # the KV reserve: the prompt and most of the reply
GENERATED = 256


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafted-paging")
    write_hf_checkpoint(root / "hf", ModelArgs.from_dict(WIDE), dtype=mx.bfloat16)
    convert(root / "hf", root / "q4", quantize=True, q_bits=4, progress=False)
    write_hf_checkpoint(root / "draft", ModelArgs.from_dict(DRAFT), dtype=mx.bfloat16, seed=5)
    return root


@pytest.fixture(scope="module")
def prompt_and_plain(folder):
    """A prompt and the resident model's plain greedy reply to it (the oracle)."""
    prompt = np.random.RandomState(0).randint(0, WIDE["vocab_size"], 32).tolist()
    resident, _ = load(folder / "q4", tokenizer=False)
    want = greedy(resident, prompt, GENERATED).tokens
    del resident
    mx.clear_cache()
    return prompt, want


def greedy(model, prompt: list[int], n: int, draft=None) -> Stats:
    *_, stats = stream_generate(model, Numbers(), prompt, draft=draft,
                                sampling=SamplingParams(temperature=0, max_tokens=n))
    return stats


def half(folder) -> int:
    """Half the model, and the process's fixed memory outside MLX every plan counts."""
    return OVERHEAD + int(0.5 * load_bytes(describe(folder / "q4")))


@pytest.mark.slow  # 256 paged tokens, drafted (15-40 s here; the draft model case is the longer)
@pytest.mark.parametrize("drafting", ["lookup", "model"])
def test_drafted_decoding_within_half_the_model_is_its_plain_decoding(folder, prompt_and_plain,
                                                                      drafting):
    """256 greedy tokens at a 50% budget, drafted: the resident model's plain tokens, with
    MLX's peak memory (loading the model and the draft model included) within the budget +
    5%; drafts were proposed (prompt lookup's, accepted, took fewer passes; the random
    draft model's seldom agree)."""
    prompt, want = prompt_and_plain
    budget = half(folder)
    needs = draft_needs(4) if drafting == "lookup" else draft_needs(3, folder / "draft")
    base = settled()  # what earlier tests in this process still hold
    model, _ = load(folder / "q4", tokenizer=False, max_memory=budget, context=CONTEXT,
                    draft=needs)
    plan = model.limits.memory_plan
    assert plan.paging and plan.draft == needs
    if drafting == "lookup":
        drafter = LookupDrafter(4)
    else:
        draft_model, _ = load(folder / "draft", tokenizer=False)
        drafter = ModelDrafter(draft_model, 3)
    stats = greedy(model, prompt, GENERATED, drafter)
    peak = mx.get_peak_memory() - base
    model.limits.expert_pager.close()
    assert stats.tokens == want
    assert stats.draft_proposed > 0
    assert drafting == "model" or stats.forward_passes < len(want)
    assert peak <= 1.05 * budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"


def test_a_verify_pass_reads_each_needed_expert_at_most_once_per_layer(folder, monkeypatch):
    """Every forward pass of drafted decoding (the verify passes over k + 1 tokens, whose
    experts outnumber the slots) reads each expert at most once per layer, counted at the
    loader; and the experts a pass reads are ones its tokens chose."""
    from mlx_mixtral.model.decoder import Model
    from mlx_mixtral.model.routing import route

    model, _ = load(folder / "q4", tokenizer=False, max_memory=half(folder), context=CONTEXT,
                    prefetch=False, draft=draft_needs(4))
    pager = model.limits.expert_pager
    passes: list[list[tuple[int, int]]] = []
    chosen: list[dict[int, set[int]]] = []
    read = pager.loader.load
    monkeypatch.setattr(pager.loader, "load", lambda layer, e, s: (
        passes[-1].append((layer, e)), read(layer, e, s))[1])
    call = Model.__call__

    def counted(self, inputs, *a, **k):
        passes.append([])
        chosen.append({})
        return call(self, inputs, *a, **k)

    monkeypatch.setattr(Model, "__call__", counted)
    for layer, moe in enumerate(m.block_sparse_moe for m in model.layers):
        gate = moe.gate
        monkeypatch.setattr(moe, "gate", lambda x, gate=gate, layer=layer: record(
            gate(x), layer))

    def record(logits, layer):
        indices, _ = route(logits, WIDE["num_experts_per_tok"])
        chosen[-1][layer] = set(np.array(indices).reshape(-1).tolist())
        return logits

    prompt = np.random.RandomState(3).randint(0, WIDE["vocab_size"], 24).tolist()
    stats = greedy(model, prompt + prompt, 24, LookupDrafter(4))
    pager.close()
    assert stats.draft_proposed > 0
    verify = [(reads, need) for reads, need in zip(passes, chosen, strict=True)
              if any(len(e) > pager.num_slots for e in need.values())]
    assert verify, "no pass needed more experts than a layer has slots"
    for reads, need in zip(passes, chosen, strict=True):
        assert len(reads) == len(set(reads)), "an expert was read twice in one pass"
        assert all(e in need[layer] for layer, e in reads)


def test_drafting_left_out_of_the_plan_is_refused(folder):
    """A model planned without drafting cannot draft within its budget unnoticed."""
    model, _ = load(folder / "q4", tokenizer=False, max_memory=half(folder), context=CONTEXT,
                    draft=draft_needs(2))
    try:
        with pytest.raises(GenerationError, match="draft_needs.4"):
            greedy(model, [1, 2, 3], 4, LookupDrafter(4))  # more tokens than planned
        draft_model, _ = load(folder / "draft", tokenizer=False)
        with pytest.raises(GenerationError, match="a draft model"):
            greedy(model, [1, 2, 3], 4, ModelDrafter(draft_model, 2))
    finally:
        model.limits.expert_pager.close()


def test_a_budget_without_room_for_the_draft_model_is_one_line(folder, cli_here):
    """The model alone fits, not with the draft model's weights and KV cache beside it: one
    line naming both ways out, exit 2, before anything loads."""
    from mlx_mixtral.loading.memory_plan import minimum_budget

    budget = f"{minimum_budget(describe(folder / 'q4')) + 10**6}B"  # the model, not the draft
    r = cli_here("generate", "--model", str(folder / "q4"), "--max-memory", budget, "--raw",
                 "--draft-model", str(folder / "draft"), "--max-tokens", "2", "t1 t2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot hold the draft model --draft-model" in r.stderr
    assert "--max-memory" in r.stderr and "--prompt-lookup 4" in r.stderr


@pytest.mark.slow  # the resident model, three paging variants and the drafted run (~40 s)
def test_bench_within_a_budget_drafts_next_to_plain_decoding(folder, cli_here):
    """(Before the CLI's generate below: a model it loaded in this process, its pager never
    closed, stays in MLX's peak.)"""
    base = settled()
    r = cli_here("bench", "--model", str(folder / "q4"), "--max-memory", "50%", "--runs", "1",
                 "--prompt-tokens", "48", "--gen-tokens", "24", "--prompt-lookup", "4",
                 "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["drafting"] == "prompt lookup 4"
    drafted = result["budgets"][0]["drafted"]
    assert drafted["same_tokens"]
    assert drafted["drafted"]["passes_per_token"] < drafted["plain"]["passes_per_token"] == 1
    assert drafted["drafted"]["bytes_per_token"] > 0
    assert drafted["drafted"]["peak_memory"] - base <= 1.05 * result["budgets"][0]["budget"]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over token ids t1 .. t{vocab_size - 1} (conftest's, wider)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="t2", bos_token="t1", unk_token="<unk>")


def test_generate_drafts_within_the_budget(folder, tmp_path, cli_here):
    """`generate --max-memory --prompt-lookup 4` drafts (the stats line counts the drafts) and
    prints plain decoding's reply within the same budget."""
    import shutil

    model = tmp_path / "q4"
    shutil.copytree(folder / "q4", model)
    word_tokenizer(WIDE["vocab_size"]).save_pretrained(model)
    prompt = " ".join(f"t{i}" for i in [5, 9, 14, 30, 5, 9, 14, 30, 5, 9])
    flags = ["--model", str(model), "--max-memory", f"{half(folder)}B", "--raw", "--temp",
             "0", "--max-tokens", "24", prompt]
    plain = cli_here("generate", *flags)
    drafted = cli_here("generate", *flags, "--prompt-lookup", "4")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert "experts per layer in memory" in drafted.stderr
    assert "drafts accepted" in drafted.stderr and "drafts accepted" not in plain.stderr
    assert drafted.stdout == plain.stdout


@pytest.mark.slow  # a 256-token prompt and 64 tokens, plain and drafted, paged (~40 s here)
def test_prompt_lookup_reads_at_most_0_6_of_plain_decodings_bytes_per_token(folder):
    """At 50%, on a prompt the model repeats (its own greedy text, which loops), drafting with
    `--prompt-lookup 4` reads at most 0.6x the bytes per generated token plain decoding reads,
    with the same tokens (bench's side-by-side run: the oracle for the tokens is plain
    decoding, and the bytes are counted at the loader)."""
    from mlx_mixtral.cli.bench_paging import drafted_side_by_side, repeating_prompt

    resident, _ = load(folder / "q4", tokenizer=False)
    prompt = repeating_prompt(resident, 256)
    del resident
    model, _ = load(folder / "q4", tokenizer=False, max_memory=half(folder), context=CONTEXT * 2,
                    draft=draft_needs(4))
    assert model.limits.memory_plan.paging
    out = drafted_side_by_side(model, prompt, 64, LookupDrafter(4))
    model.limits.expert_pager.close()
    assert out["same_tokens"]
    ratio = out["drafted"]["bytes_per_token"] / out["plain"]["bytes_per_token"]
    assert ratio <= 0.6, (ratio, out)


@pytest.mark.slow  # 256 drafted tokens paged in a fresh process (~40 s)
def test_drafted_decoding_holds_the_budget_as_the_operating_system_counts_it(folder,
                                                                             prompt_and_plain):
    """Prompt lookup at 50% in a fresh process: the resident model's 256 plain greedy tokens,
    MLX's peak within the budget + 5%, and the process's peak RSS within the budget + its own
    baseline + 10%."""
    from mlx_helpers import assert_within, fresh_paged_run

    prompt, want = prompt_and_plain
    budget = half(folder)
    run = fresh_paged_run(folder / "q4", budget, prompt, tokens=GENERATED, context=CONTEXT,
                          lookup=4)
    assert run["slots"] < WIDE["num_local_experts"]
    assert run["tokens"] == want
    assert_within(run, budget)
