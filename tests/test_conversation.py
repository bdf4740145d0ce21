"""The app's `Conversation` without the app: send, regenerate and edit on a scripted engine,
compared with the message lists they should leave (in memory, in the store, and what the
engine was asked)."""

from __future__ import annotations

import pytest

from mlx_mixtral.app.conversation import Conversation
from mlx_mixtral.app.engine import Prefill, Prompt, Ready
from mlx_mixtral.app.store import Store
from mlx_mixtral.errors import MlxMixtralError
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.stats import Chunk, Stats


class Scripted:
    """An engine whose replies are given in advance; it keeps every prompt it answered."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.prompts: list[Prompt] = []

    def reply(self, prompt, settings, emit, should_stop) -> None:
        self.prompts.append(prompt)
        text = self.replies.pop(0)
        emit(Prefill(3, 3))
        for word in text.split(" "):
            emit(Chunk(word if word == text.split(" ")[0] else " " + word, None))
        emit(Stats(prompt_tokens=5, generation_tokens=len(text.split()), ttft=0.5,
                   finish_reason="stop", context_used=40, text=text, tokens=[1, 2]))


class Failing(Scripted):
    def reply(self, prompt, settings, emit, should_stop) -> None:
        emit(Chunk("half a", None))
        raise MlxMixtralError("lost the server")


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "chats.db")
    yield store
    store.close()


def answer(conversation: Conversation, turn, engine) -> None:
    """What the app does with a turn: the worker runs it, the UI hears its events."""
    events: list = []
    turn.run(engine, events.append, lambda: False)
    conversation.hear(events)


def shown(conversation: Conversation) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, m.status) for m in conversation.messages]


def stored(store: Store, conversation: Conversation) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, m.status) for m in store.load(conversation.id).messages]


def asked(prompt: Prompt) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in prompt.messages]


def test_send_twice(store):
    engine = Scripted("Hello there", "Fine, thanks")
    c = Conversation(store, "a-model", system="Be brief.", settings=SamplingParams(top_k=5))
    answer(c, c.send("Hi"), engine)
    answer(c, c.send("How are you?"), engine)
    expected = [("user", "Hi", "complete"), ("assistant", "Hello there", "complete"),
                ("user", "How are you?", "complete"), ("assistant", "Fine, thanks", "complete")]
    assert shown(c) == expected and stored(store, c) == expected
    assert [asked(p) for p in engine.prompts] == [
        [("user", "Hi")],
        [("user", "Hi"), ("assistant", "Hello there"), ("user", "How are you?")]]
    assert {(p.system, p.key) for p in engine.prompts} == {("Be brief.", str(c.id))}
    saved = store.load(c.id)
    assert saved.title == "Hi" and saved.model == "a-model" and saved.settings["top_k"] == 5
    # The reply's numbers are kept (not its tokens or text), for the status bar too.
    assert c.numbers["context_used"] == 40 and "tokens" not in c.numbers
    assert store.load(c.id).messages[-1].stats == c.numbers
    assert c.reply is None


def test_regenerate_replaces_the_last_reply(store):
    engine = Scripted("one", "two", "three")
    c = Conversation(store, "a-model")
    answer(c, c.send("first"), engine)
    answer(c, c.send("second"), engine)
    answer(c, c.regenerate(), engine)
    expected = [("user", "first", "complete"), ("assistant", "one", "complete"),
                ("user", "second", "complete"), ("assistant", "three", "complete")]
    assert shown(c) == expected and stored(store, c) == expected
    # The new reply answers the same conversation the replaced one did.
    assert asked(engine.prompts[2]) == asked(engine.prompts[1]) == [
        ("user", "first"), ("assistant", "one"), ("user", "second")]


def test_edit_replaces_the_last_message_and_its_reply(store):
    engine = Scripted("one", "two", "three")
    c = Conversation(store, "a-model")
    answer(c, c.send("first"), engine)
    answer(c, c.send("secnod"), engine)
    answer(c, c.edit("second"), engine)
    expected = [("user", "first", "complete"), ("assistant", "one", "complete"),
                ("user", "second", "complete"), ("assistant", "three", "complete")]
    assert shown(c) == expected and stored(store, c) == expected
    assert asked(engine.prompts[2]) == [("user", "first"), ("assistant", "one"),
                                        ("user", "second")]


def test_regenerate_needs_a_reply_and_the_stream_is_saved_as_it_comes(store):
    c = Conversation(store, "a-model")
    assert c.regenerate() is None and c.id is None  # nothing sent, nothing stored
    turn = c.send("Hi")
    assert shown(c) == [("user", "Hi", "complete"), ("assistant", "", "streaming")]
    assert stored(store, c) == shown(c)  # a crash now keeps the question
    assert asked(turn.prompt) == [("user", "Hi")]  # not the empty reply


def test_a_failed_reply_is_kept_stopped_and_the_chat_goes_on(store):
    c = Conversation(store, "a-model")
    answer(c, c.send("Hi"), Failing())
    expected = [("user", "Hi", "complete"), ("assistant", "half a", "stopped")]
    assert shown(c) == expected and stored(store, c) == expected
    assert c.numbers == {} and c.reply is None
    engine = Scripted("whole")
    answer(c, c.regenerate(), engine)
    assert shown(c)[-1] == ("assistant", "whole", "complete")


def test_open_new_and_events_from_a_background_read(store):
    c = Conversation(store, "a-model", system="default system")
    answer(c, c.send("Hi"), Scripted("Hello"))
    first = c.id
    c.new()
    assert (c.id, c.messages, c.system, c.numbers) == (None, [], "default system", {})
    heard = c.hear([Prefill(10, 20), Prefill(20, 20), Ready(123)])
    assert [(p.done, p.total) for p in heard.progress] == [(10, 20), (20, 20)] and heard.ready
    assert c.numbers["context_used"] == 123 and heard.end is None
    c.open(first)
    assert shown(c) == [("user", "Hi", "complete"), ("assistant", "Hello", "complete")]
    assert c.prompt().key == str(first) and c.numbers["context_used"] == 40


def test_the_mlx_engine_reads_only_what_a_turn_changed(tmp_path, store):
    """The engine is handed the whole conversation each turn; its cache keeps what it already
    read, so a turn reads only the new message (`ChatSession.sync`)."""
    from app_helpers import tiny_model_folder

    from mlx_mixtral.app.mlx_engine import MlxEngine

    engine = MlxEngine(str(tiny_model_folder(tmp_path / "tiny")))
    engine.load(lambda _: None)
    c = Conversation(store, "tiny", settings=SamplingParams(temperature=0, max_tokens=6))

    def read(turn) -> int:
        events: list = []
        turn.run(engine, events.append, lambda: False)
        c.hear(events)
        assert isinstance(events[-1], Stats) and events[-1].error is None
        return max(e.total for e in events if isinstance(e, Prefill))

    first = read(c.send("Tell me about the rivers of Europe, " * 10))
    assert first > 80
    assert read(c.send("And lakes?")) < 20  # the message and its framing, not the history
    assert read(c.regenerate()) < 20
    assert read(c.edit("And seas?")) < 20
    assert [m.role for m in c.messages] == ["user", "assistant"] * 2
