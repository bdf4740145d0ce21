"""Chats' KV caches in the prefix store (a reopened chat prefills only what is new, exactly; a
deleted chat frees the blocks no other chat uses; damaged blocks are dropped; no per-chat files)
and `generate --prompt-cache` on the command line."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys

import mlx.core as mx
import pytest
from kv_helpers import build_models, filled

from mlx_mixtral.errors import PromptCacheError
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.stats import Stats
from mlx_mixtral.loading.prompt_cache import load_prompt_cache, save_prompt_cache


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


# ---- chats in the prefix store -------------------------------------------------------------

BLOCK = 32  # tokens per block: the tiny Mixtral's window (256) spans 8 of them
KV_BYTES = 2 * 2 * 2 * 16 * 4  # per token: 2 layers, keys and values, 2 KV heads of 16, f32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from app_helpers import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny"))


class Counting:
    """The model, counting the tokens it is given."""

    def __init__(self, model) -> None:
        self.model, self.seen = model, 0
        self.args, self.layers = model.args, model.layers

    def make_cache(self, slack: int = 0) -> list:
        return self.model.make_cache(slack)

    def __call__(self, inputs, cache=None, **kw):
        self.seen += inputs.shape[1]
        return self.model(inputs, cache=cache, **kw)


class Chats:
    """A chat database and a prefix-store folder, and engines started on them (each a new
    app, as after a restart: nothing in memory)."""

    def __init__(self, model, tmp_path) -> None:
        from mlx_mixtral.app.store import Store

        self.model, self.db, self.folder = model, tmp_path / "chats.db", tmp_path / "prefixes"
        self.store = Store(self.db)  # the app's own connection (its UI's)

    def engine(self, store: bool = True):
        from mlx_mixtral.app.chat_prefixes import ChatPrefixes
        from mlx_mixtral.app.mlx_engine import MlxEngine
        from mlx_mixtral.prefixes.settings import StoreSettings

        prefixes = ChatPrefixes(self.db, StoreSettings(BLOCK, folder=self.folder)) if store \
            else None
        engine = MlxEngine(str(self.model), prefixes=prefixes)
        engine.load(lambda _: None)
        engine.session.model = Counting(engine.session.model)
        return engine

    def chat(self, system: str | None = None) -> str:
        return str(self.store.create("tiny", system, {}))

    def blocks(self, key: str) -> list[str]:
        (row,) = self.store.db.execute("SELECT blocks FROM chat_prefixes WHERE conversation_id "
                                       "= ?", (int(key),)).fetchall()
        return json.loads(row[0])

    def files(self, keys) -> set[str]:
        """The keys among `keys` whose block files are on disk."""
        return {k for k in keys if list(self.folder.glob(f"*/{k}.block"))}

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*.block"))


def ask(engine, messages: list[dict], key: str | None, system: str | None = None,
        max_tokens: int = 16) -> Stats:
    from mlx_mixtral.app.engine import Prompt

    events = []
    engine.reply(Prompt(messages, system, key), SamplingParams(temperature=0,
                 max_tokens=max_tokens), events.append, lambda: False)
    assert isinstance(events[-1], Stats) and events[-1].error is None, events[-1]
    return events[-1]


def talk(engine, key: str, turns: list[str], system: str | None = None,
         messages: list[dict] | None = None) -> list[dict]:
    """`messages` (none) and `turns` after them, replied to by `engine`."""
    messages = list(messages or [])
    for text in turns:
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": ask(engine, messages, key, system).text})
    return messages


def plain(engine, messages: list[dict], system: str | None = None,
          max_tokens: int = 16) -> tuple[list[int], int, int]:
    """The oracle: (greedy tokens, prompt tokens, forward-pass tokens) of `messages` read
    afresh, without a cache, their replies as `engine` (the one that wrote them, still
    running) generated them."""
    from mlx_mixtral.generation.stream import stream_generate

    session = engine.session
    session.sync(messages, system)
    ids = session.conversation_ids()
    model = Counting(session.model.model)
    *_, stats = stream_generate(model, session.tokenizer, ids, temperature=0,
                                max_tokens=max_tokens)
    return stats.tokens, len(ids), model.seen


WORDS = " ".join(f"w{i}" for i in range(300))


def test_reopened_chat_prefills_only_the_new_message_and_replies_exactly(tiny, tmp_path):
    """Past the tiny Mixtral's window (256): the rolling cache is rebuilt from blocks kept as
    the prefill went by. The oracle: the same conversation read afresh by an engine without a
    store (its decode steps, the same number, are taken off the restored engine's count)."""
    chats = Chats(tiny, tmp_path)
    key = chats.chat()
    first = chats.engine()
    written = []
    history: list[dict] = []
    for _ in range(2):
        before = chats.disk_bytes()
        history = talk(first, key, [WORDS], messages=history)
        written.append(chats.disk_bytes() - before)
    held = len(first.session.cached)
    assert held >= 2000
    # A reply writes its new blocks, never the conversation again.
    assert written[1] <= 1.1 * (held - written[0] // KV_BYTES) * KV_BYTES + BLOCK * KV_BYTES
    assert not list(tmp_path.rglob("conversation-*"))  # no per-chat file

    message = {"role": "user", "content": " ".join(["the"] * 20)}
    restarted = chats.engine()
    got = ask(restarted, [*history, message], key, max_tokens=24)
    want, total, passes = plain(first, [*history, message], max_tokens=24)
    assert got.tokens == want  # greedy, token for token
    prefilled = restarted.session.model.seen - (passes - total)  # less the decode steps
    framing = 5  # [INST] ... [/INST] around the message, and the last reply's EOS
    assert 20 <= prefilled <= 20 + framing + BLOCK - 1, (prefilled, total)
    print(f"\n{total} tokens: {prefilled} prefilled after the restart (plain: {total}); "
          f"bytes written per turn {written}")


def test_deleting_a_chat_frees_only_its_unshared_blocks(tiny, tmp_path):
    """Two chats with the same system prompt share its blocks: deleting one frees the rest of
    its blocks (their files go, the store's bytes go down), the other keeps all of its own."""
    chats = Chats(tiny, tmp_path)
    system = "You are terse. " + " ".join(f"rule{i}" for i in range(60))
    a, b = chats.chat(system), chats.chat(system)
    engine = chats.engine()
    talk(engine, a, ["first chat " + WORDS[:400]], system)
    talk(engine, b, ["second chat " + WORDS[400:800]], system)
    # The second chat read its system prompt from the first one's blocks.
    framed = len(engine.session.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "x"}]))
    reused = engine.prefixes.store.stats()["tokens_reused"]
    print(f"\nsystem prompt framed: {framed} tokens, second chat reused {reused}")
    assert reused >= framed - 8 - BLOCK
    mine, theirs = set(chats.blocks(a)), set(chats.blocks(b))
    shared, only_mine = mine & theirs, mine - theirs
    assert len(shared) >= 2 and len(only_mine) >= 4
    assert chats.files(mine | theirs) == mine | theirs
    before = chats.disk_bytes()

    chats.store.delete(int(a))  # what the app does on F12, Delete (UI thread)
    engine.forget(a)  # (then on the worker)
    assert chats.files(only_mine) == set()
    assert chats.files(theirs) == theirs
    assert chats.disk_bytes() < before
    assert not chats.store.db.execute("SELECT * FROM freed_blocks").fetchall()

    # A chat deleted while no model is loaded is freed when its model loads.
    chats.store.delete(int(b))
    assert chats.files(theirs) == theirs
    chats.engine()
    assert chats.files(theirs) == set() and chats.disk_bytes() == 0


def test_damaged_blocks_are_dropped_and_the_chat_prefills_normally(tiny, tmp_path, caplog):
    """A damaged block file never stops the app: it is dropped with a log line, and the chat
    is read again (the reply is the plain path's)."""
    chats = Chats(tiny, tmp_path)
    key = chats.chat()
    first = chats.engine()
    history = talk(first, key, ["hello " + WORDS[:300]])
    for path in chats.folder.rglob("*.block"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    message = {"role": "user", "content": "again"}
    restarted = chats.engine()
    with caplog.at_level(logging.WARNING):
        got = ask(restarted, [*history, message], key)
    assert "dropped block" in caplog.text
    want, _, passes = plain(first, [*history, message])
    assert got.tokens == want
    assert restarted.session.model.seen == passes  # all of it read again
    assert chats.files(chats.blocks(key)) == set(chats.blocks(key))  # kept afresh


def test_a_store_that_cannot_write_never_stops_a_reply(tiny, tmp_path, monkeypatch, caplog):
    """A folder that cannot hold blocks (a file in its place) or a database locked too long
    costs a log line, not the reply or the chat."""
    from mlx_mixtral.app.store import Store

    chats = Chats(tiny, tmp_path)
    chats.folder.write_text("not a folder")
    key = chats.chat()
    engine = chats.engine()

    def locked(*args) -> bool:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "keep_prefix", locked)
    with caplog.at_level(logging.WARNING):
        history = talk(engine, key, ["hello " + WORDS[:300], "more"])
    assert "database is locked" in caplog.text and "prefix store" in caplog.text
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert chats.folder.read_text() == "not a folder"


def test_old_per_chat_cache_files_are_removed_at_start(tiny, tmp_path, monkeypatch, caplog):
    """`chat` deletes the files earlier versions kept per chat (one log line), and
    --prompt-cache-gb is --cache-disk in GB."""
    from test_load_plan import LoadOnly, Terminal

    from mlx_mixtral.cli.main import main

    old = tmp_path / "prompt-caches"
    old.mkdir()
    for i in range(3):
        (old / f"conversation-{i}.safetensors").write_bytes(b"an old cache")
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(sys, "stdout", Terminal())
    apps = []

    class Loaded(LoadOnly):
        def run(self) -> None:
            super().run()
            apps.append(self)

    monkeypatch.setattr("mlx_mixtral.app.chat_app.ChatApp", Loaded)
    with caplog.at_level(logging.WARNING):
        assert main(["chat", "--model", str(tiny), "--db", str(tmp_path / "chats.db"),
                     "--prompt-cache-gb", "1.5", "--cache-block", "64"]) == 0
    assert not old.exists()
    assert [r.message for r in caplog.records if "per-chat" in r.message] == [
        f"removed 3 per-chat prompt cache file(s) from {old}: chats now keep their caches in "
        "the prefix store"]
    store = apps[0].engine.prefixes.store
    assert store.disk.budget == 1_500_000_000 and store.block == 64


def test_prompt_cache_gb_with_cache_disk_is_one_line(tmp_path, cli_here):
    both = cli_here("chat", "--prompt-cache-gb", "1", "--cache-disk", "1GB")
    one_line_error(both, "--prompt-cache-gb", "--cache-disk")
    one_line_error(cli_here("chat", "--prompt-cache-gb", "-1"), "--prompt-cache-gb", "-1")
    for flags in (["--cache-disk", "1GB"], ["--prompt-cache-gb", "1"], ["--cache-block", "64"]):
        one_line_error(cli_here("chat", "--server", "http://127.0.0.1:9", *flags), flags[0],
                       "--server")


def test_a_database_of_schema_2_opens_and_deletes_its_chats(tmp_path):
    """Schema 3 adds the tables the prefix store needs; a version-2 file keeps its chats."""
    from mlx_mixtral.app import store as store_module
    from mlx_mixtral.app.store import Store

    db = tmp_path / "v2.db"
    with sqlite3.connect(db) as c:
        for script in store_module.MIGRATIONS[:2]:
            c.executescript(script)
        c.execute("PRAGMA user_version = 2")
        c.execute("INSERT INTO conversations (title, model, settings, created, updated) VALUES "
                  "('old', 'm', '{}', 0, 0)")
    store = Store(db)
    try:
        (chat,) = store.list()
        assert chat.title == "old" and store.prefix_replies(chat.id, "m") == []
        assert store.keep_prefix(chat.id, "m", [["hi", [1, 2]]], ["k1", "k2"])
        assert store.prefix_replies(chat.id, "m") == [["hi", [1, 2]]]
        store.delete(chat.id)
        assert store.take_freed_blocks("m") == ["k1", "k2"] and store.kept_blocks() == set()
        assert not store.keep_prefix(chat.id, "m", [], ["k3"])  # a deleted chat keeps nothing
    finally:
        store.close()


def test_json_metadata_is_plain(models, tmp_path):
    save_prompt_cache(tmp_path / "c.safetensors", filled(models["mixtral"], 4), {"a": "b"},
                      model=models["mixtral"], tokens=[1, 2, 3, 4])
    _, meta = mx.load(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert json.loads(meta["tokens"]) == [1, 2, 3, 4] and meta["format"]



def test_tokens_that_do_not_match_the_cache_are_refused_at_save(models, tmp_path):
    """Refused when saved, naming `tokens` (a file written anyway would fail to load, blaming
    the file)."""
    path = tmp_path / "c.safetensors"
    for wrong in ([1, 2, 3], [1, 2, 3, 4, 5]):
        with pytest.raises(PromptCacheError, match="tokens has .* 4 positions"):
            save_prompt_cache(path, filled(models["mixtral"], 4), tokens=wrong)
        assert not path.exists()


# ---- the command line ---------------------------------------------------------------------


def one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("mlx-mixtral: error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from app_helpers import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny-cli"))


def test_cli_prompt_cache_reused_and_refused_for_another_model(tiny_folder, tmp_path, cli_here):
    from mlx_mixtral.demo import demo_model_path

    path = str(tmp_path / "doc.safetensors")
    base = ["generate", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "4",
            "--prompt-cache", path]
    first = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 40 + "Summarise.")
    assert first.returncode == 0, first.stderr
    again = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 40 + "Shorter.")
    assert again.returncode == 0, again.stderr
    reused = int(again.stderr.split("Prompt cache: ")[1].split()[0])
    assert reused >= 80  # the document was not prefilled again
    other = cli_here("generate", "--model", str(demo_model_path()), "--prompt", "hi",
                "--prompt-cache", path)
    one_line_error(other, "another model")


def test_cli_prompt_cache_in_a_folder_is_one_line_before_loading(tiny_folder, tmp_path, cli_here):
    result = cli_here("generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens",
                      "2", "--prompt-cache", str(tmp_path))
    one_line_error(result, "--prompt-cache", str(tmp_path), "folder")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no "Loading" line


def test_cli_prompt_cache_named_without_safetensors_round_trips(tiny_folder, tmp_path, cli_here):
    path = tmp_path / "cache.bin"
    base = ["generate", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "2",
            "--prompt-cache", str(path)]
    first = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 20 + "Summarise.")
    assert first.returncode == 0, first.stderr
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no partial file left
    again = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 20 + "Shorter.")
    assert again.returncode == 0, again.stderr
    assert int(again.stderr.split("Prompt cache: ")[1].split()[0]) >= 40


def test_prompt_cache_api_reads_and_writes_any_file_name(models, tmp_path):
    model = models["mistral"]
    for name in ("cache.bin", "cache", "cache.npz"):
        save_prompt_cache(tmp_path / name, filled(model, 12), model=model, tokens=list(range(12)))
        loaded, meta = load_prompt_cache(tmp_path / name, return_metadata=True, model=model)
        assert meta["tokens"] == list(range(12)) and loaded[0].offset == 12


def test_cli_bad_drafting_and_kv_flags(tiny_folder, cli_here):
    from mlx_mixtral.demo import demo_model_path

    base = ["generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "3"]
    one_line_error(cli_here(*base, "--draft-model", str(demo_model_path())), "--draft-model",
                   "vocabulary (49152 tokens)", "(32000 tokens)")
    one_line_error(cli_here(*base, "--kv-bits", "5"), "--kv-bits must be one of 4, 8")
    one_line_error(cli_here(*base, "--prompt-lookup", "2", "--draft-model", "x"), "exclude")
    ok = cli_here(*base, "--prompt-lookup", "3", "--temp", "0")
    assert ok.returncode == 0 and "drafts accepted" in ok.stderr, ok.stderr
