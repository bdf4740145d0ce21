"""Reading paged experts: the reader pool, coalesced reads, cold reads from the disk, and the
budget as the operating system counts it (RSS), against the resident model as the oracle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.loading import describe, load
from mlx_mixtral.loading.memory import load_bytes
from mlx_mixtral.loading.memory_plan import OVERHEAD
from mlx_mixtral.model.config import ModelArgs

SMALL = dict(model_type="mixtral", vocab_size=256, hidden_size=128, intermediate_size=1024,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
             rope_theta=1e4)
# For the RSS test: experts large enough next to the runtime's own ~12 MB that half the model
# pages (16 experts, top-2: two slots are an eighth of them), few layers so 256 tokens are quick.
FAT = dict(SMALL, vocab_size=512, hidden_size=256, intermediate_size=2048,
           num_hidden_layers=4, num_local_experts=16)
_MX = {mx.uint32: "U32", mx.bfloat16: "BF16", mx.float32: "F32", mx.float16: "F16"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe)\.switch_mlp\."
                     r"(gate|up|down)_proj\.(weight|scales|biases)$")


def write_in_order(path: Path, tensors: dict[str, mx.array]) -> None:
    """A safetensors file with the tensors in the dict's order (mx.save_safetensors does not
    keep it)."""
    header, blobs, at = {}, [], 0
    for name, value in tensors.items():
        raw = np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value)
        header[name] = {"dtype": _MX[value.dtype], "shape": list(value.shape),
                        "data_offsets": [at, at + raw.nbytes]}
        blobs.append(raw.tobytes())
        at += raw.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def per_expert_folder(mlx_folder: Path, out: Path) -> Path:
    """`mlx_folder` with each expert's nine tensors (Hugging Face names) end to end in the file,
    in gate/up/down order, as a streaming layout writes them."""
    out.mkdir()
    weights: dict[str, mx.array] = {}
    for f in sorted(mlx_folder.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    for f in mlx_folder.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            (out / f.name).write_bytes(f.read_bytes())
    ordered = {k: v for k, v in weights.items() if not _EXPERT.match(k)}
    layers = sorted({_EXPERT.match(k)[1] for k in weights if _EXPERT.match(k)})
    experts = SMALL["num_local_experts"]
    for layer in layers:
        for e in range(experts):
            for proj, hf in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                for param in ("weight", "scales", "biases"):
                    ordered[f"{layer}.experts.{e}.{hf}.{param}"] = \
                        weights[f"{layer}.switch_mlp.{proj}_proj.{param}"][e]
    write_in_order(out / "model.safetensors", ordered)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reads")
    write_hf_checkpoint(root / "hf", ModelArgs.from_dict(SMALL), dtype=mx.bfloat16, seed=5)
    # float32 scales, as the CPU's slots hold them: nothing goes through the staging buffer
    convert(root / "hf", root / "q4", quantize=True, q_bits=4, dtype="float32",
            progress=False)
    return root / "q4", per_expert_folder(root / "q4", root / "contiguous")


def paged(folder: Path, **kw):
    budget = OVERHEAD + int(0.6 * load_bytes(describe(folder)))
    model, _ = load(folder, tokenizer=False, max_memory=budget, context=256, **kw)
    assert model.limits.memory_plan.paging
    return model, model.limits.expert_pager


def slot_arrays(pager, layer: int) -> list[np.ndarray]:
    return [np.array(v).copy() for v in pager.loader.views[layer].values() for v in v[:1]]


def test_a_contiguous_expert_is_one_read_and_the_slots_hold_the_resident_weights(folders):
    """Coalesced: the nine ranges of an expert stored end to end are one read call (against
    nine each, read alone); either way the slot holds the resident model's expert (oracle:
    its stacked tensors' row)."""
    stacked, contiguous = folders
    resident, _ = load(stacked, tokenizer=False)
    mlp = resident.layers[1].block_sparse_moe.switch_mlp
    want = {name: np.array(value[5]) for name, value in _named_params(mlp)}
    for coalesce, calls in ((True, 1), (False, 9)):
        model, pager = paged(contiguous, read_threads=1)
        pager.loader.set_coalesce(coalesce)
        pager.loader.read_calls = 0
        assert pager.loader.load(1, 5, 0) > 0
        assert pager.loader.read_calls == calls, coalesce
        got = {name: np.array(value[0]) for name, value in
               _named_params(model.layers[1].block_sparse_moe.switch_mlp)}
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        pager.close()


def _named_params(mlp):
    from mlx.utils import tree_flatten

    return tree_flatten(mlp.parameters())


def test_several_threads_read_a_layers_misses_together(folders, monkeypatch):
    """With 4 reader threads, a layer's two misses are read in pieces by several threads at
    once (each expert cut in four, one piece per thread, the experts in turn), and the logits
    are the resident model's."""
    from mlx_mixtral.loading import expert_files

    stacked, contiguous = folders
    monkeypatch.setattr(expert_files, "MIN_PIECE", 1 << 12)  # cut even these small experts
    resident, _ = load(stacked, tokenizer=False)
    model, pager = paged(contiguous, read_threads=4)
    readers: list[str] = []
    meet = threading.Barrier(2, timeout=10)  # the first two pieces in flight at once
    span = pager.loader._read_span

    def read_span(*a):
        readers.append(threading.current_thread().name)
        if len(readers) <= 2:
            meet.wait()
        return span(*a)

    monkeypatch.setattr(pager.loader, "_read_span", read_span)
    pager.loader.read_calls = 0
    assert pager._read(0, [(3, 0), (6, 1)]) > 0
    assert pager.loader.read_calls == 8  # four pieces per expert
    assert len(set(readers)) >= 2 and all(r.startswith("expert-reads") for r in readers)
    ids = mx.array([list(range(1, 50))])
    np.testing.assert_allclose(np.array(model(ids)), np.array(resident(ids)), atol=1e-5, rtol=0)
    pager.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts disk reads via /proc")
def test_cold_reads_come_from_the_disk_every_time(folders):
    """Cold mode (bench's): each range read is dropped from the page cache again, so reading
    the same expert three times reads it from storage three times (the OS's own count);
    warm, the page cache serves the repeats."""
    from mlx_mixtral.loading.page_cache import disk_read_bytes, drop_files

    _, contiguous = folders
    model, pager = paged(contiguous, read_threads=1)
    files = pager.loader
    read = {}
    for cold in (True, False):
        drop_files(files.paths)
        files.set_cold(cold)
        before = disk_read_bytes()
        one = files.load(0, 2, 0)
        files.load(0, 2, 0)
        files.load(0, 2, 0)
        read[cold] = disk_read_bytes() - before
        files.set_cold(False)
    pager.close()
    assert read[True] >= 2.5 * one, read  # (the kernel reads ahead: more than asked)
    assert read[False] <= read[True] / 2, read


def test_a_budget_limits_mlxs_buffer_cache_to_what_the_plan_leaves(folders):
    """Freed buffers MLX keeps count in RSS, not in its peak: within a budget the cache may
    keep no more than the plan leaves for the KV cache and working memory."""
    model, pager = paged(folders[1])
    pager.close()
    before = mx.set_cache_limit(10**12)  # (it answers the limit it replaces)
    assert before == model.limits.memory_plan.cache_limit < model.limits.memory_plan.budget


@pytest.mark.parametrize("value", ["0", "many", "65"])
def test_a_bad_read_threads_is_one_line(folders, value, cli_here):
    r = cli_here("generate", "--model", str(folders[0]), f"--read-threads={value}", "hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--read-threads" in r.stderr and "Traceback" not in r.stderr
    from mlx_mixtral.errors import ConfigError

    with pytest.raises(ConfigError, match="read_threads must be"):
        load(folders[0], tokenizer=False, max_memory="1GB", read_threads=0)


# One paged run in a fresh interpreter: its baseline RSS after the imports, then loading and
# 256 greedy tokens; MLX's peak and the process's peak RSS over both.
RUN = """
import json, sys
import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_mixtral.generation.stream import prefill_chunk
from mlx_mixtral.loading import load
from mlx_mixtral.loading.process_memory import current_rss, peak_rss, reset_peak_rss
folder, budget, prompt = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
base = current_rss()
reset_peak_rss()
mx.reset_peak_memory()
model, _ = load(folder, tokenizer=False, max_memory=budget)
tokens = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=256,
          prefill_step_size=prefill_chunk(model, 512))]
model.limits.expert_pager.close()
print(json.dumps({"tokens": tokens, "base": base, "rss": peak_rss(),
                  "mlx": mx.get_peak_memory(), "slots": model.limits.memory_plan.slots}))
"""


@pytest.mark.slow  # three 256-token generations, two of them paged (70 s; 225 s on a busy machine)
def test_the_budget_holds_in_rss_and_the_tokens_are_the_resident_models(tmp_path):
    """A paged Mixtral at 50% of its size (short prompt) and at the minimum budget (a
    1,500-token prompt), the default reader threads: the resident model's 256 greedy tokens,
    MLX's peak within the budget + 5%, and the process's peak RSS within the budget + the
    interpreter's own baseline + 10% of the budget."""
    from mlx_lm.generate import generate_step

    from mlx_mixtral.loading.memory_plan import minimum_budget

    write_hf_checkpoint(tmp_path / "hf", ModelArgs.from_dict(FAT), dtype=mx.bfloat16, seed=7)
    convert(tmp_path / "hf", tmp_path / "q4", quantize=True, q_bits=4, progress=False)
    folder = tmp_path / "q4"
    source = describe(folder)
    rng = np.random.RandomState(3)
    cases = [(int(0.5 * load_bytes(source)), rng.randint(0, 512, 24).tolist()),
             (minimum_budget(source), rng.randint(0, 512, 1500).tolist())]
    resident, _ = load(folder, tokenizer=False)
    for budget, prompt in cases:
        want = [int(t) for t, _ in generate_step(mx.array(prompt), resident, max_tokens=256)]
        r = subprocess.run([sys.executable, "-c", RUN, str(folder), str(budget),
                            json.dumps(prompt)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["slots"] < FAT["num_local_experts"]
        assert got["tokens"] == want, budget
        assert got["mlx"] <= 1.05 * budget, (got["mlx"] / budget, budget)
        over = got["rss"] - got["base"]
        assert over <= 1.10 * budget, f"RSS {over / budget:.2f}x the budget of {budget:,}"


class GatedLoader:
    """Reads that wait for `go` (those of the `gated` experts: all when None; one job per
    expert, no `pieces`), logging their order and which finished."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.gated: set[int] | None = None
        self.order: list[tuple[int, int]] = []
        self.finished: list[int] = []

    def load(self, layer: int, expert: int, slot: int) -> int:
        self.order.append((layer, expert))
        if self.gated is None or expert in self.gated:
            assert self.go.wait(10)
        self.finished.append(expert)
        return 1000

    def close(self) -> None:
        self.go.set()


def gated_pager(threads: int):
    from mlx_mixtral.model.expert_cache import ExpertPager

    loader = GatedLoader()
    pager = ExpertPager(8, 3, [None] * 2, 2, loader, read_threads=threads)
    loader.go.set()
    pager.begin(1, np.array([0, 1]), None)
    pager.fill(1, [0, 1])  # layer 1 holds 0 and 1 (0 least recently used) and a free slot
    loader.go.clear()
    loader.order.clear()
    loader.finished.clear()
    pager.reset_stats()
    return pager, loader


def test_a_wrong_guess_not_yet_read_is_withdrawn_and_its_slot_given_back():
    """One reader thread, layer 1 guessed {5, 6}: 5 takes the free slot and is being read, 6
    evicts 0 and waits in the queue. The layer then needs {5, 1}: 6 is withdrawn without a
    byte read and 0 is back in its slot (intact), 5 is waited for. Without withdrawal (the
    baseline) 6 is read to the end and 0 is gone."""
    for baseline in (False, True):
        pager, loader = gated_pager(1)
        pager.baseline = baseline
        pager.start_prefetch(1, np.array([[5, 6]]))
        slot_of_0 = int(pager.slots[1].table[0])
        threading.Timer(0.2, loader.go.set).start()
        pager.begin(1, np.array([5, 1]), None)
        slots = pager.slots[1]
        if not baseline:  # 0 is back as the least recently used, the next to go
            assert list(slots.where)[0] == 0, list(slots.where)
        pager.fill(1, [5, 1])
        pager.wait()
        if baseline:
            assert loader.order == [(1, 5), (1, 6)] and slots.resident(6)
            assert not slots.resident(0)
        else:
            assert loader.order == [(1, 5)] and loader.finished == [5]
            assert not slots.resident(6) and slots.resident(0)
            assert int(slots.table[0]) == slot_of_0
            assert pager.stats.layers[1].withdrawn == 1
            assert pager.stats.layers[1].bytes_read == 1000
            assert pager.stats.layers[1].reads == 1  # the withdrawn guess is no read
        pager.close()


def test_the_guess_names_the_likeliest_expert_first():
    """The next layer's router scores the experts 0 < 1 < ... < 7 for this input: the guess is
    [7, 6], the likeliest first (it is read first, and a wrong last guess is withdrawn)."""
    import mlx.nn as nn

    from mlx_mixtral.model.expert_cache import ExpertPager

    gate = nn.Linear(4, 8, bias=False)
    gate.weight = mx.array(np.outer(np.arange(8), np.ones(4)).astype(np.float32))
    pager = ExpertPager(8, 3, [None, gate], 2, GatedLoader(), read_threads=1)
    guess = pager.guess(0, mx.ones((1, 1, 4)))
    assert np.array(guess).reshape(-1).tolist() == [7, 6]
    pager.close()


def test_a_wrong_guess_being_read_is_waited_for_and_its_slot_freed():
    """Two threads, the same guess, but the layer needs {6, 1}, and 6's read is done while 5's
    is still running when 5 turns out wrong: 5's read is waited for (it still writes into
    the slot) and its slot is freed, not handed back to 0 (whose bytes are overwritten)."""
    pager, loader = gated_pager(2)
    loader.gated = {5}
    pager.start_prefetch(1, np.array([[5, 6]]))
    threading.Timer(0.3, loader.go.set).start()
    pager.begin(1, np.array([6, 1]), None)
    assert 5 in loader.finished  # 5's read ended before its slot could be given out again
    pager.fill(1, [6, 1])
    slots = pager.slots[1]
    assert not slots.resident(5) and slots.resident(6) and slots.resident(1)
    assert len(slots.free) == 1 and pager.stats.layers[1].withdrawn == 1
    pager.close()


def test_the_next_layers_guess_is_read_after_this_layers_misses():
    """Two reader threads: layer 0 misses 3 and 4 and guesses {5, 6} for layer 1; the misses
    are read first (the baseline starts the guess first)."""
    for baseline in (False, True):
        pager, loader = gated_pager(2)
        pager.baseline = baseline
        threading.Timer(0.3, loader.go.set).start()
        pager.begin(0, np.array([3, 4]), np.array([[5, 6]]))
        time.sleep(0.05)  # (a guess started in begin is surely taken by then)
        pager.fill(0, [3, 4])
        pager.wait()
        if baseline:
            assert loader.order[0] in {(1, 5), (1, 6)}, loader.order
        else:
            assert set(loader.order[:2]) == {(0, 3), (0, 4)}, loader.order
        assert sorted(loader.order) == [(0, 3), (0, 4), (1, 5), (1, 6)]
        pager.close()


def test_slow_reads_withdraw_wrong_guesses_and_give_the_resident_tokens(folders, monkeypatch):
    """Reads slower than computing (each piece 20 ms late), as cold reads are: wrong guesses
    are withdrawn, and 24 greedy tokens are the resident model's."""
    from mlx_lm.generate import generate_step

    stacked, contiguous = folders
    resident, _ = load(stacked, tokenizer=False)
    model, pager = paged(contiguous, read_threads=2)
    span = pager.loader._read_span

    def slow(*a):
        time.sleep(0.02)
        return span(*a)

    monkeypatch.setattr(pager.loader, "_read_span", slow)
    prompt = mx.array(np.random.RandomState(3).randint(3, 256, 12))
    want = [int(t) for t, _ in generate_step(prompt, resident, max_tokens=24)]
    got = [int(t) for t, _ in generate_step(prompt, model, max_tokens=24)]
    pager.wait()
    assert got == want
    assert pager.stats.total().withdrawn > 0
    pager.close()


def test_a_paged_model_let_go_of_gives_back_its_memory_and_its_reader_threads(folders):
    """A paged model dropped without closing its pager (as the server and the chat app drop a
    model they switch from, before close_model): its reader threads end and MLX's memory is
    what it was before the load, three loads in a row."""
    import gc

    from mlx_helpers import settled

    base = settled()
    threads = threading.active_count()
    for _ in range(3):
        model, pager = paged(folders[1], read_threads=4)
        model(mx.array([[1, 2, 3]]))
        mx.eval(model.parameters())
        assert threading.active_count() >= threads + 4
        del model, pager
        gc.collect()
        mx.clear_cache()
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads
    assert mx.get_active_memory() <= base


def test_the_chat_apps_engine_reads_every_picked_model_with_read_threads(folders):
    """`chat --read-threads 3`: the first model and one picked later in the app page their
    experts with 3 reader threads (the picker planned the next model without it before)."""
    from test_drafted_paging import word_tokenizer

    from mlx_mixtral.app.mlx_engine import MlxEngine
    from mlx_mixtral.loading.memory_plan import minimum_budget

    for folder in folders:  # the app loads a tokenizer with the model
        word_tokenizer(SMALL["vocab_size"]).save_pretrained(folder)
    budget = minimum_budget(describe(folders[1]))  # the fewest slots, the app's context
    engine = MlxEngine(str(folders[1]), max_memory=budget, read_threads=3)
    for name in (folders[1], folders[0]):
        engine.select(str(name))
        engine.load(lambda done: None)
        assert engine.model.limits.expert_pager.read_threads == 3
    engine.select(str(folders[1]))
