"""The chat app, driven with Textual's pilot on a tiny real Mixtral (Mistral v1 tokenizer)."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

import pytest
from app_helpers import tiny_model_folder, wait_until

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.mlx_engine import MlxEngine
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import AssistantMessage, PromptInput, UserMessage
from mlx_mixtral.generation.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-mixtral"))


def make_app(model_folder, db, settings=GREEDY, export_dir=None):
    return ChatApp(MlxEngine(str(model_folder)), str(model_folder), Store(db),
                   settings=settings, export_dir=export_dir)


@asynccontextmanager
async def running(app):
    """Run `app` headless at 120x40; yield its pilot once the model is loaded."""
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.info is not None)
        yield pilot


async def reply_to(app, pilot, *keys: str) -> None:
    """Press keys that start a reply, and wait for it to finish."""
    done = app.replies_done
    await pilot.press(*keys)
    await wait_until(pilot, lambda: app.replies_done > done)


async def send(app, pilot, text: str) -> None:
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.text = text
    await reply_to(app, pilot, "enter")


def db_messages(db):
    store = Store(db)
    try:
        (c,) = store.list()
        return store.load(c.id).messages
    finally:
        store.close()


async def test_send_streams_a_reply(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    app = make_app(model_folder, db)
    async with running(app) as pilot:
        assert app.info.is_moe and app.info.chat_format == "mistral-v1"
        await send(app, pilot, "Hello there")
        replies = list(app.query(AssistantMessage))
        assert len(replies) == 1 and replies[0].text
        assert not app.query_one("#experts").has_class("hidden")  # MoE: the panel shows
    messages = db_messages(db)
    assert [(m.role, m.status) for m in messages] == [("user", "complete"),
                                                     ("assistant", "complete")]
    assert messages[1].content == replies[0].text
    assert messages[1].stats["generation_tokens"] <= 12


async def test_escape_stops_mid_reply(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    app = make_app(model_folder, db, SamplingParams(temperature=1.0, max_tokens=3000, seed=1))
    async with running(app) as pilot:
        app.query_one(PromptInput).text = "Tell me everything"
        app.query_one(PromptInput).focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: (r := app.conversation.reply) is not None and r.content)
        await reply_to(app, pilot, "escape")
        reply = list(app.query(AssistantMessage))[-1]
        assert reply.has_class("stopped")
    stored = db_messages(db)[-1]
    assert stored.status == "stopped" and stored.content == reply.text
    assert stored.stats["generation_tokens"] < 3000


async def test_regenerate_edit_and_new_chat(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    app = make_app(model_folder, db, SamplingParams(temperature=1.0, max_tokens=8, seed=None))
    async with running(app) as pilot:
        await send(app, pilot, "First question")
        await reply_to(app, pilot, "ctrl+r")
        assert len(app.query(AssistantMessage)) == 1
        assert [m.role for m in db_messages(db)] == ["user", "assistant"]

        await pilot.press("ctrl+l")
        prompt = app.query_one(PromptInput)
        assert prompt.text == "First question"
        assert prompt.cursor_location == (0, len("First question"))  # typing goes at the end
        prompt.text = "Edited question"
        await reply_to(app, pilot, "enter")
        assert [w.text for w in app.query(UserMessage)] == ["Edited question"]
        stored = db_messages(db)
        assert [(m.role, m.content) for m in stored][0] == ("user", "Edited question")
        assert len(stored) == 2

        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: not app.query(UserMessage))
        assert app.conversation.id is None
        assert app.focused is prompt  # typing goes straight into the new chat


async def test_settings_change_applies_to_the_next_reply(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    app = make_app(model_folder, db, SamplingParams(temperature=0, max_tokens=40))
    async with running(app) as pilot:
        await send(app, pilot, "One")
        first = db_messages(db)[-1].stats["generation_tokens"]
        await pilot.press("f3")
        await wait_until(pilot, lambda: app.screen.query("#set-max_tokens"))
        field = app.screen.query_one("#set-max_tokens")
        field.value = "3"
        await pilot.click("#save")
        await wait_until(pilot, lambda: app.conversation.settings.max_tokens == 3)
        await send(app, pilot, "Two")
    stored = db_messages(db)
    assert first > 3 and stored[-1].stats["generation_tokens"] <= 3
    store = Store(db)
    assert store.list()[0].settings["max_tokens"] == 3  # saved with the chat
    store.close()


async def test_reopen_lists_and_restores(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    app = make_app(model_folder, db)
    async with running(app) as pilot:
        await send(app, pilot, "Remember me")
        await send(app, pilot, "And this")
        before = [(type(w).__name__, w.text) for w in app.query("#messages > *")]
    again = make_app(model_folder, db, SamplingParams())
    async with running(again) as pilot:
        sidebar = again.query_one("#sidebar")
        assert len(sidebar.children) == 1
        sidebar.focus()
        sidebar.index = 0
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(again.query("#messages > *")) == 4)
        after = [(type(w).__name__, w.text) for w in again.query("#messages > *")]
        assert after == before
        assert again.conversation.settings == GREEDY  # the chat's settings came back with it
        await send(again, pilot, "Still there?")  # the conversation goes on
        assert len(again.query(AssistantMessage)) == 3


async def test_export_markdown_and_json(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    out = tmp_path / "out"
    app = make_app(model_folder, db, export_dir=out)
    async with running(app) as pilot:
        await send(app, pilot, "Export me")
        app.conversation.system = None
        app.store.update(app.conversation.id, system="Be brief.")  # set after the first reply
        await pilot.press("f5")
        await wait_until(pilot, lambda: len(list(out.glob("*.json"))) == 1)
        await pilot.press("f5")  # a second export never overwrites the first
        await wait_until(pilot, lambda: len(list(out.glob("*.json"))) == 2)
    first = sorted(out.glob("*.json"))[0]
    md = first.with_suffix(".md").read_text()
    data = json.loads(first.read_text())
    stored = db_messages(db)
    assert [(m["role"], m["content"], m["status"]) for m in data["messages"]] == [
        (m.role, m.content, m.status) for m in stored]
    assert all(m["created"] for m in data["messages"]) and data["created"]
    assert data["messages"][1]["stats"]["generation_tokens"] > 0
    assert data["settings"]["max_tokens"] == 12
    assert data["system"] == "Be brief." and data["system_applies_from_message"] == 2
    assert "**You:**\n\nExport me" in md and stored[1].content in md
    assert md.index(stored[1].content) < md.index("**System prompt (set after 2 messages")


async def test_load_error_is_shown_in_the_app(tmp_path):
    from app_helpers import FakeEngine

    from mlx_mixtral.errors import WeightsError

    class Broken(FakeEngine):
        def load(self, progress):
            raise WeightsError("model.safetensors: truncated safetensors file")

    app = ChatApp(Broken(), "broken-model", Store(tmp_path / "chats.db"))
    async with app.run_test(size=(120, 40)) as pilot:
        loading = app.query_one("#loading-text")
        await wait_until(pilot, lambda: "Could not load" in str(loading.render()))
        assert "truncated safetensors file" in str(loading.render())
        assert app.info is None


def _long_chat(db, model_folder, turns: int = 6) -> int:
    store = Store(db)
    cid = store.create(str(model_folder), None, GREEDY.to_dict(), "a long chat")
    for i in range(turns):
        store.add_message(cid, "user", f"Question {i}: " + "tell me about rivers " * 30)
        store.add_message(cid, "assistant", f"Answer {i}: " + "rivers flow to the sea " * 30)
    store.close()
    return cid


class Slow:
    """A model that takes its time (sleeping, so the UI thread keeps running)."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        time.sleep(0.05)
        return self.model(*args, **kwargs)


def _rising(seen: list[tuple[int, int]]) -> bool:
    done = [d for d, _ in seen]
    return done == sorted(done) and len(set(done)) == len(done)


async def test_opening_a_chat_prefills_its_history_with_progress(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    cid = _long_chat(db, model_folder)
    app = make_app(model_folder, db)
    async with running(app) as pilot:
        await app.open_conversation(cid)
        await wait_until(pilot, lambda: app.prefill_seen
                         and app.prefill_seen[-1][0] == app.prefill_seen[-1][1])
        history = list(app.prefill_seen)
        total = history[-1][1]
        assert total > 1000 and len(history) >= 4 and _rising(history)
        assert "chat ready" in str(app.query_one("#status").render())
        # The next reply reads only the new message: the history is in the cache already.
        app.prefill_seen.clear()
        await send(app, pilot, "And lakes?")
        assert app.prefill_seen and app.prefill_seen[-1][1] < 40


async def test_a_long_prompt_shows_its_count_and_esc_stops_it(model_folder, tmp_path):
    from mlx_mixtral.app.mlx_engine import PREFILL_STEP

    app = make_app(model_folder, tmp_path / "chats.db")
    async with running(app) as pilot:
        await send(app, pilot, "Summarise: " + "the quick brown fox jumps " * 200)
        seen = list(app.prefill_seen)
        assert seen[-1][1] > 4 * PREFILL_STEP and len(seen) >= 4 and _rising(seen)
        # Esc while the prompt is being read ends the turn at the next chunk.
        app.prefill_seen.clear()
        app.engine.session.prefill_step = 16
        app.engine.session.model = Slow(app.engine.session.model)  # slow enough to stop
        prompt = app.query_one(PromptInput)
        prompt.text = "Again: " + "over the lazy dog " * 200
        prompt.focus()
        done = app.replies_done
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.prefill_seen)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_done > done)
        assert app.prefill_seen[-1][0] < app.prefill_seen[-1][1]
        assert db_messages(tmp_path / "chats.db")[-1].status == "stopped"
        await send(app, pilot, "Still there?")  # the chat goes on: turns still alternate
        assert db_messages(tmp_path / "chats.db")[-1].status == "complete"


async def test_deleting_a_chat_leaves_nothing_of_it_on_disk(model_folder, tmp_path):
    """Issue 27, finding 1: F12 → Delete removed the chat from the database but kept its saved
    KV cache (replies' text and token ids in its metadata). Now its caches are blocks in the
    prefix store, and its replies' token ids and block keys rows of the database: its blocks
    (shared with no other chat) and rows go with it, and no per-chat file is ever written."""
    from mlx_mixtral.app.chat_prefixes import ChatPrefixes
    from mlx_mixtral.app.screens import ConfirmScreen
    from mlx_mixtral.prefixes.settings import StoreSettings

    data = tmp_path / "data"
    store = Store(data / "chats.db")
    prefixes = ChatPrefixes(store.path, StoreSettings(16, folder=data / "prefixes"))
    app = ChatApp(MlxEngine(str(model_folder), prefixes=prefixes), str(model_folder), store,
                  settings=GREEDY)

    def blocks():
        return list((data / "prefixes").rglob("*.block"))

    async with running(app) as pilot:
        await send(app, pilot, "zebracorn secret words")
        await wait_until(pilot, lambda: blocks())  # kept with the reply
        assert store.db.execute("SELECT replies FROM chat_prefixes").fetchone()
        await pilot.press("f12")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: not app.store.list())
        await wait_until(pilot, lambda: not blocks())
    prefixes.close()
    files = [p for p in data.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith("conversation-")], files
    assert not store.db.execute("SELECT * FROM chat_prefixes").fetchall()
    for p in files:  # the database keeps no readable trace either
        assert b"zebracorn" not in p.read_bytes(), p
