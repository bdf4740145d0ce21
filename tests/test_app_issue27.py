"""The chat app's findings of issue 27 (10, 11, 13, 14, 15, 22, 23, 26), on a fake engine or a
fake server: the pilot presses the keys a person would."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from app_helpers import FakeEngine, ready, send, wait_until

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.commands import ChatCommands
from mlx_mixtral.app.http_engine import HttpEngine
from mlx_mixtral.app.screens import ConfirmScreen, HelpScreen, ModelPickerScreen
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import MessageList, PromptInput
from mlx_mixtral.generation.stats import Stats

SIZE = (120, 40)


def make_app(tmp_path, engine=None, **kwargs) -> ChatApp:
    return ChatApp(engine or FakeEngine(), "fake-mixtral", Store(tmp_path / "chats.db"),
                   **kwargs)


def status(app) -> str:
    return str(app.query_one("#status").render())


class StoppedInPrefill(FakeEngine):
    """A reply stopped while its prompt was read: no token came, only the prompt's numbers."""

    def reply(self, prompt, settings, emit, should_stop):
        emit(Stats(prompt_tokens=512, prompt_tps=20.0, generation_tokens=0, ttft=25.6,
                   peak_memory=2_500_000_000, finish_reason="stopped", context_used=256))


# ---- 23: unknown numbers are not shown; 1 token, 2 tokens ----------------------------------

async def test_the_status_bar_shows_no_placeholders_before_the_first_reply(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        line = status(app)
        assert "tok/s" not in line and "TTFT" not in line and "peak" not in line, line
        assert " - " not in line and "context 0/32768" in line
        await send(pilot, "hello")
        line = status(app)
        assert "42.0 tok/s" in line and "TTFT 0.25 s" in line and "peak 2.50 GB" in line


def test_counts_are_singular_and_plural():
    line = str(Stats(prompt_tokens=1, generation_tokens=1))
    assert "prompt: 1 token," in line and "generation: 1 token," in line
    assert "prompt: 2 tokens," in str(Stats(prompt_tokens=2))


# ---- 11: a reply stopped before its first token has no TTFT --------------------------------

async def test_a_reply_stopped_while_reading_says_stopped_not_a_ttft(tmp_path):
    app = make_app(tmp_path, StoppedInPrefill())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "a long document ...")
        line = status(app)
        assert "stopped" in line and "TTFT" not in line and "tok/s" not in line, line


# ---- 26: Left/Right in the delete dialog -----------------------------------------------------

async def test_left_and_right_move_between_the_delete_dialogs_buttons(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "delete me")
        await pilot.press("f12")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert app.focused.id == "no"  # the safe answer first
        await pilot.press("left")
        assert app.focused.id == "yes"
        await pilot.press("right")
        assert app.focused.id == "no"
        await pilot.press("left", "enter")
        await wait_until(pilot, lambda: not app.store.list())


# ---- 22: F4 on a dense model says why nothing shows -----------------------------------------

async def test_f4_on_a_dense_model_says_it_has_no_experts(tmp_path):
    app = make_app(tmp_path, FakeEngine(moe=False))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f4")
        await pilot.pause()
        said = [n.message for n in app._notifications]
        assert any("no experts" in m for m in said), said
        assert app.query_one("#experts").has_class("hidden")


# ---- 13: the palette ranks whole words first -------------------------------------------------

async def test_the_palette_ranks_a_chat_with_the_word_above_loose_command_matches(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "write a haiku about the sea")
        provider = ChatCommands(app.screen)
        hits = sorted([h async for h in provider.search("sea")], key=lambda h: -h.score)
        shown = [str(h.match_display) for h in hits]
        loose = [s for s in shown if not s.startswith("Open chat")]
        assert loose, "the query should match some command loosely"  # (else no test)
        assert shown[0].startswith("Open chat: write a haiku"), shown
        # A command holding the word still comes before one holding its letters only.
        hits = sorted([h async for h in provider.search("chat")], key=lambda h: -h.score)
        tiers = ["chat" in str(h.match_display).lower() for h in hits]
        assert tiers == sorted(tiers, reverse=True), [str(h.match_display) for h in hits]


# ---- 14: Tab into the chat list, and paging the conversation from the message box -----------

async def test_tab_into_the_chat_list_highlights_a_row_that_enter_opens(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "first chat")
        first = app.conversation.id
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: app.conversation.id is None)
        app.query_one(PromptInput).focus()
        await pilot.press("tab")
        sidebar = app.query_one("#sidebar")
        assert app.focused is sidebar and sidebar.index is not None
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.conversation.id == first)


async def test_page_up_in_the_message_box_scrolls_the_conversation(tmp_path):
    engine = FakeEngine(reply="\n\n".join(f"Paragraph {i}." for i in range(40)))
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "a long answer, please")
        await pilot.pause()
        messages = app.query_one(MessageList)
        messages.scroll_end(animate=False)
        await pilot.pause()
        bottom = messages.scroll_y
        assert bottom > 0 and app.focused is app.query_one(PromptInput)
        await pilot.press("pageup")
        await wait_until(pilot, lambda: messages.scroll_y < bottom)
        up = messages.scroll_y
        await pilot.press("pagedown")
        await wait_until(pilot, lambda: messages.scroll_y > up)
        await pilot.press("f1")  # the help says so
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert ("PageUp", "scroll the conversation up (PageDown: down), also from the message "
                "box") in app.screen.keys


# ---- 15: the first run's hint is shown in the app ----------------------------------------------

async def test_the_first_runs_hint_shows_in_the_empty_chat_not_as_a_toast(tmp_path):
    from mlx_mixtral.app.widgets import Notice

    hint = "Offline: opening the demo model; to chat with Mistral later: ..."
    app = make_app(tmp_path, notice=hint)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.pause()
        (notice,) = app.query(Notice)
        assert hint in str(notice.render()) and not list(app._notifications)
        await send(pilot, "hello")
        assert not app.query(Notice)  # read: the conversation takes its place


# ---- 10: chat --server -------------------------------------------------------------------------

SERVED: dict[str, dict] = {}  # id -> the rest of its /v1/models entry


class _Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": name, "object": "model", **more}
                                                      for name, more in SERVED.items()]})
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    SERVED.clear()
    SERVED.update({"served-a": {"context_length": 4096}, "served-b": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


async def test_chat_with_a_server_names_its_model_and_shows_what_the_server_tells(server,
                                                                                  tmp_path):
    engine = HttpEngine(server)
    app = ChatApp(engine, engine.base, Store(tmp_path / "chats.db"))  # as `chat --server URL`
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.model_name == "served-a"  # the model's id, not the URL's last part
        app.conversation.send("hi")
        # The numbers a server's reply gives: no peak memory; the context from /v1/models.
        app.conversation.finish(HttpEngine._stats(
            0.0, 0.5, {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}, 10,
            "x", "stop"))
        assert app.store.list()[0].model == "served-a"
        app._status()
        line = status(app)
        assert "context 30/4096" in line and "peak" not in line and "0/0" not in line, line

        # Another served model, whose context the server does not say.
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen))
        assert "available" not in str(app.screen.query_one("#note").render())
        app.screen.query_one("#models").highlighted = 1
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.info is not None and app.info.name == "served-b")
        app._status()
        assert "context 30" in status(app) and "context 30/" not in status(app)

        # A model the server no longer serves: said why, and the chat goes on with the last.
        del SERVED["served-a"]
        app._switch_model("served-a")
        await wait_until(pilot, lambda: app.info is not None and app.info.name == "served-b")
        said = " ".join(n.message for n in app._notifications)
        assert "does not serve 'served-a'" in said and "failed" not in status(app)


# ---- 11: a prefill that may be stopped reads short chunks --------------------------------------

class PerToken:
    """A model at least `seconds` per prompt token: a slow machine, whatever this one is."""

    def __init__(self, model, seconds: float) -> None:
        self.model, self.seconds = model, seconds

    def __call__(self, tokens, *args, **kwargs):
        import time

        import mlx.core as mx

        out = self.model(tokens, *args, **kwargs)
        mx.eval(out)
        time.sleep(self.seconds * tokens.shape[-1])
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def chunks(seen: list[int]) -> list[int]:
    """The chunks read, from the progress heard after each (tokens done so far)."""
    done = [0, *seen]
    return [b - a for a, b in zip(done, done[1:], strict=False) if b > a]


def test_a_stoppable_prefill_reads_chunks_that_end_within_a_second(tmp_path):
    """Issue 27, finding 11: Esc waited for the rest of a 256-token chunk (15-37 s on a slow
    machine). Counted, not timed: at >= 10 ms a token, no chunk after the first may pass 100
    tokens (STOP_WITHIN = 1 s), and a stop comes at the next chunk's end."""
    from app_helpers import tiny_model_folder

    from mlx_mixtral import load
    from mlx_mixtral.generation.session import ChatSession
    from mlx_mixtral.model.limits import PROBE_STEP, STOP_WITHIN

    model, tokenizer = load(tiny_model_folder(tmp_path / "tiny"))
    session = ChatSession(model, tokenizer)
    session.prefill_step = 256  # the app's
    session.model = PerToken(model, 0.01)
    cap = int(STOP_WITHIN / 0.01)
    session.load_messages([{"role": "user", "content": "fox " * 120},
                           {"role": "assistant", "content": "ok"}])
    seen: list[int] = []
    session.prefill(lambda done, total: seen.append(done), lambda: False)
    read = chunks(seen)
    assert sum(read) > 2 * cap and read[0] == PROBE_STEP and max(read[1:]) <= cap, read

    from mlx_mixtral.generation.stats import Chunk, PrefillStopped

    seen.clear()

    def stop_after_a_chunk(done: int, total: int) -> None:
        seen.append(done)
        if done:
            raise PrefillStopped  # Esc: the app's engine raises this between chunks

    pieces = list(session.send("dog " * 120, progress=stop_after_a_chunk, temperature=0))
    assert seen[-1] <= cap, seen  # one chunk read, no longer than a second's worth
    assert [p.text for p in pieces if isinstance(p, Chunk)] == [""]
    stats = session.last_stats
    assert stats.generation_tokens == 0 and stats.finish_reason == "stopped"
