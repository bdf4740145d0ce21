"""Screenshots of the app (a fake engine keeps them deterministic). Regenerate after a
deliberate UI change with: pytest tests/test_app_snapshots.py --snapshot-update"""

from __future__ import annotations

from pathlib import Path

from app_helpers import FakeEngine, wait_until
from textual.widgets import Input

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.screens import HelpScreen, SettingsScreen
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import PromptInput
from mlx_mixtral.sampling import SamplingParams

SIZE = (110, 34)


def make_app(tmp_path: Path, moe: bool = True) -> ChatApp:
    return ChatApp(FakeEngine(moe=moe), "fake-mixtral", Store(tmp_path / "chats.db"),
                   settings=SamplingParams(temperature=0.7, max_tokens=256, seed=42))


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.info is not None)
    pilot.app.query_one(PromptInput).cursor_blink = False  # a blinking cursor is a coin toss
    pilot.app.clear_notifications()
    await pilot.pause(0.1)


async def chat_once(pilot) -> None:
    app = pilot.app
    await ready(pilot)
    app.query_one(PromptInput).text = "Say hello and show me some code."
    app.query_one(PromptInput).focus()
    done = app.replies_done
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_done > done)
    await pilot.wait_for_scheduled_animations()
    app.clear_notifications()
    await pilot.pause(0.5)


def test_main_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path, moe=False), terminal_size=SIZE, run_before=chat_once)


def test_experts_panel(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=chat_once)


def test_settings_screen(snap_compare, tmp_path):
    async def open_settings(pilot):
        await ready(pilot)
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False
        await pilot.pause(0.5)

    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=open_settings)


def test_help_screen(snap_compare, tmp_path):
    async def open_help(pilot):
        await ready(pilot)
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen))
        await pilot.pause(0.5)

    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=open_help)
