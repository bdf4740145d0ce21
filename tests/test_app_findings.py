"""The app's behaviour a newcomer relies on (issue 17's findings), on the fake engine."""

from __future__ import annotations

from app_helpers import FakeEngine, ready, send, wait_until

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.commands import ChatCommands
from mlx_mixtral.app.screens import ConfirmScreen, TextPromptScreen
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import AssistantMessage, PromptInput
from mlx_mixtral.generation.sampling import SamplingParams

SIZE = (120, 40)


def make_app(tmp_path, **kwargs) -> ChatApp:
    engine = kwargs.pop("engine", None) or FakeEngine()
    return ChatApp(engine, "fake-mixtral", Store(tmp_path / "chats.db"), **kwargs)


async def two_chats(pilot, first: str, second: str) -> int:
    """Once the model is loaded, send `first` in a chat and `second` in a new one; return the
    first chat's id (the second is current)."""
    await ready(pilot)
    await send(pilot, first)
    chat = pilot.app.conversation.id
    await pilot.press("ctrl+n")
    await send(pilot, second)
    return chat


async def test_delete_asks_first_and_ctrl_d_is_the_text_boxs(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "keep me")
        prompt = app.query_one(PromptInput)
        prompt.text = "abc"
        prompt.move_cursor((0, 0))
        await pilot.press("ctrl+d")  # the text box's delete-right, nothing else
        assert prompt.text == "bc" and len(app.store.list()) == 1
        await pilot.press("f12")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")  # no
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        assert len(app.store.list()) == 1 and app.focused is prompt
        await pilot.press("f12")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: not app.store.list())
        assert app.conversation.id is None


async def test_text_box_keys_are_not_shadowed(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.text = "hello world"
        prompt.move_cursor((0, 0))
        await pilot.press("ctrl+e")  # end of line
        assert prompt.cursor_location == (0, 11)
        prompt.move_cursor((0, 5))
        await pilot.press("ctrl+k")  # kill to the end of the line
        assert prompt.text == "hello"


async def test_opening_a_chat_focuses_the_prompt_and_marks_the_chat(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        first = await two_chats(pilot, "first chat", "second chat")
        sidebar = app.query_one("#sidebar")
        sidebar.focus()
        index = [item.conversation_id for item in sidebar.children].index(first)
        sidebar.index = index
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.conversation.id == first)
        assert app.focused is app.query_one(PromptInput)
        current = [item for item in sidebar.children if item.has_class("current")]
        assert [item.conversation_id for item in current] == [first]
        await pilot.press("x")  # keystrokes land in the message box
        assert app.query_one(PromptInput).text == "x"


async def test_new_chats_start_from_the_defaults_and_the_status_says_what_is_set(tmp_path):
    app = make_app(tmp_path, system=None, settings=SamplingParams())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        app.conversation.system = "Talk like a pirate."
        app.conversation.settings = SamplingParams(temperature=0.2)
        app._status()
        status = str(app.query_one("#status").render())
        assert "system prompt" in status and "temp 0.2" in status
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: app.conversation.id is None)
        assert app.conversation.system is None and app.conversation.settings == SamplingParams()
        status = str(app.query_one("#status").render())
        assert "system prompt" not in status and "temp" not in status


async def test_a_reopened_chat_shows_its_own_numbers(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        chat = app.conversation.id
        stored = app.store.load(chat).messages[-1]
        app.store.update_message(stored.id, stored.content, "complete",
                                 {**stored.stats, "context_used": 569, "ttft": 9.87})
        await pilot.press("ctrl+n")
        await send(pilot, "another")  # its numbers: TTFT 0.25, context 40
        await app.open_conversation(chat)
        status = str(app.query_one("#status").render())
        assert "TTFT 9.87 s" in status and "context 569/" in status


async def test_stopping_inside_a_code_block_closes_it_first(tmp_path):
    engine = FakeEngine(reply="Here:\n\n```python\n" + "x = 1\n" * 200)
    engine.delay = 0.01
    app = make_app(tmp_path, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.text = "code please"
        done = app.replies_done
        await pilot.press("enter")
        await wait_until(pilot, lambda: (r := app.conversation.reply) is not None
                         and "x = 1" in r.content)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.replies_done > done)
        reply = list(app.query(AssistantMessage))[-1]
        source = reply.source
        assert source.rstrip().endswith("```\n\n*[stopped]*".rstrip())
        assert source.count("```") == 2


async def test_no_toast_covers_the_prompt_at_start(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.pause(0.2)
        assert not list(app._notifications)
        assert "model loaded" in str(app.query_one("#status").render())


async def test_palette_offers_actions_chats_by_their_words_and_rename(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        danube = await two_chats(pilot, "tell me about the Danube", "something else")
        provider = ChatCommands(app.screen)
        hits = [hit async for hit in provider.search("danube")]
        assert any(str(h.match_display).startswith("Open chat: tell me about the Danube")
                   for h in hits)
        actions = [str(h.match_display) async for h in provider.search("rename")]
        assert "Rename this chat" in actions
        found = [h for h in hits if "Danube" in str(h.match_display)][0]
        await found.command()
        assert app.conversation.id == danube

        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: isinstance(app.screen, TextPromptScreen))
        field = app.screen.query_one("#text")
        field.value = "Rivers of Europe"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.store.load(danube).title == "Rivers of Europe")


async def test_status_bar_keeps_the_note_on_a_narrow_terminal(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        note = "reading this chat: 256/517 tokens, about 12 s left"
        app._status(note=note)
        await pilot.pause()
        line = str(app.query_one("#status").render())
        assert note in line and len(line) <= 78


async def test_long_code_lines_scroll_and_long_model_names_do_not_wrap(tmp_path):
    from textual.widgets._markdown import MarkdownFence

    engine = FakeEngine(reply="```python\nprint('" + "x" * 300 + "')\n```")
    app = make_app(tmp_path, engine=engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.store.create("/models/Mixtral-8x7B-Instruct-v0.1-mixed-3-4-with-a-very-long-name",
                         None, {}, "a chat with a long title that goes on and on")
        await send(pilot, "code")
        fence = app.query(MarkdownFence).last()
        assert fence.styles.scrollbar_size_horizontal == 1  # a visible bar, not clipped text
        assert fence.max_scroll_x > 0
        for item in app.query_one("#sidebar").children:
            assert item.outer_size.height == 2  # title and model, one line each


POEM = "Roses are red,\nViolets are blue,\nSugar is sweet,\nAnd so are you."
UNFENCED = "python\ndef add_numbers(x, y):\n    return x + y"


def test_hard_breaks_keep_single_lines_but_not_inside_code():
    """Issue 27, finding 3: Markdown joins single lines into one paragraph."""
    from mlx_mixtral.app.widgets import hard_breaks

    assert hard_breaks(POEM) == POEM.replace("\n", "  \n")
    assert hard_breaks(UNFENCED) == ("python  \ndef add_numbers(x, y):  \n"
                                     + "\u00a0\u200b" * 4 + "return x + y")
    fenced = "Code:\n\n```python\ndef f():\n    return 1\n```\nafter"
    assert hard_breaks(fenced) == fenced.replace("Code:\n", "Code:  \n")
    indented = "Code:\n\n    x = 1\n    y = 2\n\nend"
    assert hard_breaks(indented) == indented.replace("Code:\n", "Code:  \n")
    nested = "- a\n  - b\n- c"  # a nested list stays nested
    assert hard_breaks(nested) == "- a  \n  - b  \n- c"


def shown_lines(widget) -> list[str]:
    """The text the widget's blocks draw, line by line, without trailing blanks."""
    from textual.geometry import Region
    from textual.widgets._markdown import MarkdownBlock

    lines = []
    for block in widget.query(MarkdownBlock):
        region = Region(0, 0, block.size.width, block.size.height)
        lines += [strip.text.rstrip() for strip in block.render_lines(region)]
    return [line.replace("\u00a0", " ").replace("\u200b", "") for line in lines if line.strip()]


async def test_replies_keep_their_line_breaks_and_indentation(tmp_path):
    app = make_app(tmp_path, engine=FakeEngine(reply=POEM + "\n\n" + UNFENCED))
    want = POEM.split("\n") + UNFENCED.split("\n")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "a poem and some code")  # streamed
        await pilot.pause()
        streamed = shown_lines(app.query(AssistantMessage).last())
        assert streamed == want, streamed
        chat = app.conversation.id
        await pilot.press("ctrl+n")
        await app.open_conversation(chat)  # built from the stored text
        await pilot.pause()
        assert shown_lines(app.query(AssistantMessage).last()) == want
