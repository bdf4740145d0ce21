"""The prefix store's acceptance (issue 24) at the library level: replies continued from blocks
read back after a restart equal cold runs; turns only append; the tiers keep their budgets;
killed writers and damaged files never reach a reply, and a disk that cannot be written costs
only the disk tier; blocks of other KV representations or other models are never used, and
forgetting a chat keeps what others share.

The oracle is always the cold run: the same prompt through `stream_generate` with no store.
Kills and damage are done to real block files, in a folder of the test's own."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from kv_helpers import GREEDY, Ids, build_models, tokens

from mlx_mixtral.generation import Chunk, stream_generate
from mlx_mixtral.generation.kv import KVSettings
from mlx_mixtral.generation.stream import settle
from mlx_mixtral.model.cache import FullKVCache, parts
from mlx_mixtral.prefixes.settings import model_key
from mlx_mixtral.prefixes.store import PrefixStore

BLOCK = 8  # tokens per block: prompts of ~100 tokens make a dozen blocks
CHUNK = 12  # prefill tokens per forward pass: blocks end inside chunks too
REPLY = 32  # greedy tokens compared with the cold run
GROUP = 32  # the KV quantization group (the tiny models' heads are 32 wide)
PLENTY = 1 << 30  # bytes: a budget that evicts nothing
WRITER = Path(__file__).with_name("block_writer.py")
LOGGER = "mlx_mixtral.prefixes"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


@dataclass
class Reply:
    tokens: list[int]
    first: np.ndarray  # the first step's log-probabilities over the whole vocabulary
    keys: list[str]  # the store's keys for the whole sequence (when given to a store)


def kv(bits: int | None) -> KVSettings | None:
    return KVSettings(bits=bits, group_size=GROUP) if bits else None


def store_at(model, folder: Path | None, ram: int = PLENTY, disk: int = PLENTY,
             block: int = BLOCK) -> PrefixStore:
    return PrefixStore(model_key(model), folder, block, ram, disk)


def reply(model, ids: list[int], cache: list | None = None, bits: int | None = None,
          n: int = REPLY, store: PrefixStore | None = None, before: list[int] = ()) -> Reply:
    """A greedy reply to `ids` (after `before`, which `cache` holds). With `store`, the cache
    is given to it after each prefill chunk (as callers do, for sliding windows) and at the
    end, with the reply."""
    cache = model.make_cache() if cache is None else cache
    whole = [*before, *ids]

    def progress(done: int, total: int) -> None:
        store.give(whole[:cache[0].offset], cache)

    out, first = [], None
    for chunk in stream_generate(model, Ids(), ids, sampling=GREEDY, max_tokens=n, cache=cache,
                                 kv=kv(bits), prefill_step_size=CHUNK,
                                 progress=progress if store else None,
                                 logprobs=model.args.vocab_size):
        if isinstance(chunk, Chunk) and chunk.token is not None:
            if first is None:
                first = np.array([p for _, p in sorted(chunk.top_logprobs)])
            out.append(chunk.token)
    keys = []
    if store is not None:
        settle()
        keys = store.give(whole + out, cache)
    return Reply(out, first, keys)


def same_as_cold(warm: Reply, cold: Reply) -> None:
    assert len(warm.tokens) >= REPLY and warm.tokens == cold.tokens
    assert np.abs(warm.first - cold.first).max() <= 1e-5


def continued(model, store: PrefixStore, ids: list[int], bits: int | None = None,
              n: int = REPLY, give: bool = False) -> tuple[Reply, int]:
    """The reply to `ids` continued from what the store holds of them, and how many tokens
    it held."""
    cache, held = store.take(ids, model.make_cache, bits=bits, group_size=GROUP)
    return reply(model, ids[held:], cache, bits, n, store if give else None, ids[:held]), held


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def block_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.block"))


def fingerprint(path: Path) -> tuple[int, str]:
    """What changes when a file is rewritten: its inode (a rename) or its content."""
    return path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest()


def kv_bytes_per_token(cache: list) -> float:
    total = 0.0
    for layer in cache:
        keys, values = layer.state
        held = parts(keys)[0].shape[2]
        total += sum(x.nbytes for x in (*parts(keys), *parts(values))) / held
    return total


def ram_bytes(store: PrefixStore) -> int:
    """The RAM tier's bytes, counted from its arrays (not from its own counter)."""
    return sum(x.nbytes for b in store.ram.blocks.values() for x in b.arrays.values())


def resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# ---- exact after a restart ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bits"), [("mixtral", None), ("mixtral", 8), ("mistral", None),
                                            ("mistral", 8)])
def test_reply_from_disk_after_restart_equals_cold_run(models, tmp_path, name, bits):
    """A chat's prompt (90 tokens, the windowed Mistral's window is 16) and reply fill the
    store; a new store on the folder with no RAM reads every block back from disk. A
    follow-up question, another question after the same prompt (whose blocks a windowed cache
    held only during the prefill) and a text branching inside the reply continue exactly as
    cold runs."""
    model = models[name]
    windowed = name == "mistral"
    prompt = tokens(90, 1)
    answer = reply(model, prompt, bits=bits, n=30, store=store_at(model, tmp_path))
    seen = prompt + answer.tokens  # 120 tokens: 15 whole blocks
    follow_up, other, branch = seen + tokens(10, 2), prompt + tokens(10, 3), seen[:100] + [5] * 9
    # The reply is decoded one token at a time and given at its end: a windowed cache held
    # its blocks 88..104 at no give, so a branch inside it goes back to the prompt's blocks.
    for ids, reusable in ((follow_up, len(seen)), (other, len(prompt) // BLOCK * BLOCK),
                          (branch, 88 if windowed else 96)):
        cold = reply(model, ids, bits=bits)
        store = store_at(model, tmp_path, ram=0)  # a restart: every block comes from disk
        warm, held = continued(model, store, ids, bits)
        assert held == reusable
        same_as_cold(warm, cold)
        stats = store.stats()
        assert stats["disk_block_hits"] > 0 and stats["ram_block_hits"] == 0


@pytest.mark.parametrize("name", ["mixtral", "mistral"])
def test_a_second_conversation_reads_the_shared_system_prompt(models, tmp_path, name):
    """Two conversations with one 100-token system prompt: the second one takes all of its
    whole blocks (also from a windowed cache, which held them only during the first one's
    prefill) and replies as a cold run does."""
    model = models[name]
    store = store_at(model, tmp_path)
    system = tokens(100, 20)
    reply(model, system + tokens(12, 21), n=8, store=store)
    ids = system + tokens(12, 22)
    warm, held = continued(model, store, ids)
    assert held == len(system) // BLOCK * BLOCK
    same_as_cold(warm, reply(model, ids))


# ---- append only ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bits", "block"), [("mixtral", None, 16), ("mistral", 8, 8)])
def test_chat_turns_only_append(models, tmp_path, name, bits, block):
    """Each turn writes at most its new tokens' KV and one block more; a block file once
    written keeps its inode and content (a read may touch its time)."""
    model = models[name]
    store = store_at(model, tmp_path, block=block)
    seen: list[int] = []
    known: dict[Path, tuple[int, str]] = {}
    for turn in range(6):
        question = tokens(5 + 7 * turn, 10 + turn)
        ids = seen + question
        before = folder_bytes(tmp_path) if tmp_path.exists() else 0
        cache, held = store.take(ids, model.make_cache, bits=bits, group_size=GROUP)
        answer = reply(model, ids[held:], cache, bits, 11 + turn, store, ids[:held])
        seen = ids + answer.tokens
        now = {p: fingerprint(p) for p in block_files(tmp_path)}
        assert {p: now.get(p) for p in known} == known  # none rewritten (none evicted either)
        # Each file has a fixed header and trailer (the arrays' names and shapes, the
        # checksum): under 1 KB, a third of this tiny model's 8-bit block of 8 tokens but a
        # thousandth of a real model's block. Aside from it, the turn wrote KV.
        per_token = kv_bytes_per_token(cache)
        size = {p.stat().st_size for p in now}
        assert len(size) == 1, size  # (one model, one block size, one representation)
        overhead = size.pop() - block * per_token
        assert 0 < overhead < 1024
        written = folder_bytes(tmp_path) - before - overhead * (len(now) - len(known))
        new = len(question) + len(answer.tokens)
        assert written <= (new + block) * per_token, (turn, written, new)
        assert len(now) == len(seen) // block
        known = now


# ---- budgets ----------------------------------------------------------------------------------


def test_tiers_keep_their_budgets_over_100_conversations(models, tmp_path):
    """100 conversations, many sharing one of five system prompts: after each, the RAM tier
    (counted from its arrays) and the folder (counted on disk) are within their budgets plus
    one block, and every tenth reply still equals its cold run."""
    model = models["mixtral"]
    ram, disk = 200_000, 1_000_000
    store = store_at(model, tmp_path, ram=ram, disk=disk)
    rng = random.Random(0)
    systems = [tokens(rng.randrange(16, 64), 100 + i) for i in range(5)]
    for i in range(100):
        ids = rng.choice(systems) + tokens(rng.randrange(8, 40), 200 + i)
        answer, _ = continued(model, store, ids, n=REPLY if i % 10 == 9 else 4, give=True)
        one_block = max(b.nbytes for b in store.ram.blocks.values())
        assert store.nbytes == ram_bytes(store) <= ram + one_block, i
        assert folder_bytes(tmp_path) <= disk + max(p.stat().st_size
                                                    for p in block_files(tmp_path)), i
        if i % 10 == 9:
            same_as_cold(answer, reply(model, ids))
    stats = store.stats()
    assert stats["ram_evictions"] > 100 and stats["disk_evictions"] > 100
    assert stats["hits"] > 50 and stats["disk_block_hits"] > 0


def test_resident_memory_stays_within_the_ram_budget():
    """Conversations whose KV (a bigger model's shape: 4 layers of 8 heads of 128, float16)
    adds up to several times the RAM budget: the process's resident memory stays within its
    start (after one conversation) plus the budget, plus 10%. The KV is made up, not computed:
    what is measured is what the store keeps, and a model's prefill of that much is slow."""
    layers, heads, width = 4, 8, 128
    budget = 50 * 10**6
    store = PrefixStore("made-up model", None, 64, budget, 0)
    rng = random.Random(1)
    systems = [tokens(rng.randrange(256, 512), 300 + i) for i in range(8)]

    def conversation(i: int) -> None:
        ids = rng.choice(systems) + tokens(rng.randrange(32, 160), 400 + i)
        cache, held = store.take(ids, lambda: [FullKVCache() for _ in range(layers)])
        for start in range(held, len(ids), 128):  # a prefill, chunk by chunk
            end = min(start + 128, len(ids))
            for layer in cache:
                x = mx.full((1, heads, end - start, width), i, mx.float16)
                layer.update_and_fetch(x, x)
            mx.eval([layer.state for layer in cache])
            store.give(ids[:end], cache)

    conversation(-1)
    mx.clear_cache()  # (MLX keeps freed buffers for reuse: not the store's)
    start = resident()
    for i in range(100):
        conversation(i)
        mx.clear_cache()
        assert resident() <= (start + budget) * 1.1, (i, resident() - start)
    assert store.stats()["ram_evictions"] > 100 and store.nbytes > budget * 0.9


# ---- faults -----------------------------------------------------------------------------------


def test_writers_killed_mid_write_leave_nothing_used(models, tmp_path, caplog):
    """A writer (its own process) rewrites a prompt's blocks in a loop and is killed with
    SIGKILL at 10 random moments. After each kill a new store sweeps the dead writer's partial
    files, reads no damaged block, and the reply continued from what it finds equals the cold
    run."""
    model = models["mixtral"]
    prompt, question = tokens(192, 40), tokens(8, 41)
    source, target = tmp_path / "source", tmp_path / "target"
    reply(model, prompt, n=1, store=store_at(model, source))
    cold = reply(model, prompt + question)
    rng = random.Random(2)
    partials, reused = 0, []  # kills that left a partial file; tokens the store had
    for _ in range(10):
        writer = subprocess.Popen(
            [sys.executable, str(WRITER), str(source), str(target), model_key(model),
             str(BLOCK), str(len(model.make_cache())), ",".join(map(str, prompt))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = writer.stdout.readline()
        assert line == "writing\n", writer.communicate()[1]
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()  # (a dead writer not waited for is still alive to its pid)
        partials += bool(list(target.glob("*/.*.partial")))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            store = store_at(model, target, ram=0)
            assert not list(target.glob("*/.*.partial"))
            warm, held = continued(model, store, prompt + question)
        assert warnings_of(caplog) == [] and store.stats()["disk_dropped"] == 0
        same_as_cold(warm, cold)
        reused.append(held)
    assert partials >= 3 and max(reused) > 0, (partials, reused)  # kills landed in writes


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    at = {"size": 0, "header": 20, "middle": len(data) // 2, "mark": len(data) - 40,
          "digest": len(data) - 1}
    if how.startswith("cut"):
        path.write_bytes(bytes(data[:len(data) // 2 if how == "cut half" else -1]))
        return
    data[at[how]] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_block_is_dropped_once_and_recomputed(models, tmp_path, caplog):
    """A block file with a byte flipped (the safetensors header's size, its JSON, the middle
    of the data, the trailer's mark, its digest) or cut short is dropped with one log line and
    deleted; the prefix up to it is still used and the reply equals the cold run."""
    model = models["mixtral"]
    prompt, question = tokens(96, 50), tokens(8, 51)
    pristine = tmp_path / "pristine"
    keys = reply(model, prompt, n=1, store=store_at(model, pristine)).keys
    cold = reply(model, prompt + question)
    hurt = 5  # the sixth block: five before it are still good
    for how in ("size", "header", "middle", "mark", "digest", "cut half", "cut one"):
        folder = tmp_path / how
        shutil.copytree(pristine, folder)
        (path,) = folder.glob(f"*/{keys[hurt]}.block")
        damage(path, how)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            store = store_at(model, folder, ram=0)
            warm, held = continued(model, store, prompt + question)
        lines = warnings_of(caplog)
        assert len(lines) == 1 and path.name in lines[0], (how, lines)
        assert not path.exists() and store.stats()["disk_dropped"] == 1
        assert held == hurt * BLOCK, how
        same_as_cold(warm, cold)


def test_a_byte_flipped_anywhere_drops_the_block(models, tmp_path, caplog):
    """A byte flipped at 64 places spread over a block file: each time the block is dropped
    with one log line, and what comes back stops before it."""
    model = models["mixtral"]
    prompt = tokens(24, 52)
    keys = reply(model, prompt, n=1, store=store_at(model, tmp_path)).keys
    (path,) = tmp_path.glob(f"*/{keys[1]}.block")
    good = path.read_bytes()
    for at in range(0, len(good), -(-len(good) // 64)):
        path.write_bytes(good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1:])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            held = store_at(model, tmp_path, ram=0).take([*prompt, 1], model.make_cache)[1]
        assert (held, len(warnings_of(caplog)), path.exists()) == (BLOCK, 1, False), at


# ---- what is never shared ---------------------------------------------------------------------


def test_float_and_quantized_blocks_never_mix(models, tmp_path):
    model = models["mixtral"]
    store = store_at(model, tmp_path)
    plain, quantized = tokens(40, 60), tokens(40, 61)
    reply(model, plain, n=1, store=store)
    reply(model, quantized, bits=8, n=1, store=store)

    def take(ids: list[int], bits: int | None, group: int = GROUP) -> tuple[list, int]:
        return store.take([*ids, 1], model.make_cache, bits=bits, group_size=group)

    cache, held = take(quantized, None)  # a float request: never quantized blocks
    assert held == 0 and cache[0].bits is None
    for bits, group in ((4, GROUP), (8, 64)):  # nor other bits or groups
        assert take(quantized, bits, group)[1] == 0
    cache, held = take(quantized, 8)
    assert held == len(quantized) and cache[0].bits == 8
    cache, held = take(plain, None)
    assert held == len(plain) and cache[0].bits is None and not isinstance(cache[0].keys, tuple)
    assert take(plain, 8)[1] == 0  # nor float blocks for an 8-bit request (see below)


def test_quantized_reply_never_starts_from_float_blocks(models, tmp_path):
    """Float blocks of a prompt (an earlier run without KV quantization) quantized for an
    8-bit request would hold KV computed with float attention: the reply would differ from
    the cold 8-bit run (here from its fifth token). The request computes its own."""
    model = models["mistral"]
    prompt = tokens(90, 1)
    reply(model, prompt, n=1, store=store_at(model, tmp_path))
    ids = prompt + tokens(10, 2)
    warm, held = continued(model, store_at(model, tmp_path), ids, bits=8)
    assert held == 0
    same_as_cold(warm, reply(model, ids, bits=8))


def test_two_models_never_share_blocks(models, tmp_path):
    """The windowed Mistral and its draft differ only in their weights: the same prompt's
    blocks of one are never used for the other, though they share the folder."""
    one, two = models["mistral"], models["draft"]
    assert model_key(one) != model_key(two)
    prompt = tokens(40, 70)
    reply(one, prompt, n=1, store=store_at(one, tmp_path))
    assert store_at(one, tmp_path).take([*prompt, 1], one.make_cache)[1] == len(prompt)
    other = store_at(two, tmp_path)
    assert other.take([*prompt, 1], two.make_cache)[1] == 0
    same_as_cold(reply(two, prompt, store=other), reply(two, prompt))
    assert len(list(tmp_path.glob("*/space.json"))) == 2


def test_forget_keeps_blocks_other_chats_share(models, tmp_path):
    model = models["mixtral"]
    store = store_at(model, tmp_path)
    system = tokens(32, 80)
    one, two = system + tokens(24, 81), system + tokens(24, 82)
    keys_one = reply(model, one, n=8, store=store).keys
    keys_two = reply(model, two, n=8, store=store).keys
    shared = set(keys_one) & set(keys_two)
    assert len(shared) == len(system) // BLOCK
    files = len(block_files(tmp_path))
    assert store.forget(keys_one, keep=keys_two) > 0
    assert len(block_files(tmp_path)) == files - (len(keys_one) - len(shared))
    assert all(k not in store.ram.blocks for k in set(keys_one) - shared)
    for ids, held in ((one, len(system)), (two, len(two))):
        for fresh in (store, store_at(model, tmp_path, ram=0)):  # in RAM and on disk
            assert fresh.take([*ids, 1], model.make_cache)[1] == held


@pytest.mark.parametrize("fault", ["full", "not a folder"])
def test_a_disk_that_cannot_be_written_costs_only_the_disk_tier(models, tmp_path, caplog,
                                                                monkeypatch, fault):
    """A full disk (fsync fails) or a folder that is a file: the reply is still the cold
    run's, one log line says so, the RAM tier keeps the blocks; once the disk can be written
    again, the next turn's blocks reach it."""
    model = models["mixtral"]
    folder = tmp_path / "prefixes"
    prompt = tokens(40, 90)
    if fault == "full":
        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
    else:
        folder.write_text("not a folder")
    store = store_at(model, folder)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        answer = reply(model, prompt, store=store)
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "cannot write" in lines[0], lines
    same_as_cold(answer, reply(model, prompt))
    assert not block_files(tmp_path) and not list(tmp_path.rglob("*.partial"))
    assert store.take([*prompt, 1], model.make_cache)[1] == len(prompt)  # from RAM
    monkeypatch.undo()
    if fault != "full":
        folder.unlink()  # (the file in the folder's way)
    other = tokens(40, 91)
    reply(model, other, n=1, store=store)
    assert store_at(model, folder, ram=0).take([*other, 1], model.make_cache)[1] == len(other)


def test_blocks_written_after_the_folder_was_cleared_are_found_again(models, tmp_path):
    """The folder removed under an open store (another process clearing it): the blocks it
    writes next are described again, so a restart finds them."""
    model = models["mixtral"]
    folder = tmp_path / "prefixes"
    store = store_at(model, folder)
    reply(model, tokens(40, 92), n=1, store=store)
    shutil.rmtree(folder)
    other = tokens(40, 93)
    reply(model, other, n=1, store=store)
    assert store_at(model, folder, ram=0).take([*other, 1], model.make_cache)[1] == len(other)


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"model": "x"}'])
def test_a_damaged_space_description_is_written_again(models, tmp_path, garbage):
    """A space.json that is not JSON or not a description hides its space's blocks: the next
    blocks given describe the space again, so a restart finds them (before, the blocks were
    written under the damaged file and never found)."""
    model = models["mixtral"]
    folder = tmp_path / "prefixes"
    reply(model, tokens(40, 94), n=1, store=store_at(model, folder))
    (described,) = folder.glob("*/space.json")
    described.write_text(garbage)
    prompt = tokens(40, 95)
    reply(model, prompt, n=1, store=store_at(model, folder))
    assert store_at(model, folder, ram=0).take([*prompt, 1], model.make_cache)[1] == len(prompt)


def test_opening_a_store_spares_partial_files_this_process_is_writing(models, tmp_path, caplog,
                                                                     monkeypatch):
    """A second store opened on the folder (another thread of this process) while the first
    writes a block: its sweep of dead writers' partial files leaves that one alone."""
    model = models["mixtral"]
    real_fsync, opened = os.fsync, []

    def fsync_opening_another_store(fd: int) -> None:
        if not opened:
            opened.append(store_at(model, tmp_path))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_opening_another_store)
    prompt = tokens(40, 94)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        reply(model, prompt, n=1, store=store_at(model, tmp_path))
    assert opened and warnings_of(caplog) == []
    assert store_at(model, tmp_path, ram=0).take([*prompt, 1], model.make_cache)[1] == len(prompt)
