"""Screenshots of the app (a fake engine keeps them deterministic). Regenerate after a
deliberate UI change with: pytest tests/test_app_snapshots.py --snapshot-update"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import FakeEngine, settle, wait_until
from textual.widgets import Input

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.engine import ModelList
from mlx_mixtral.app.screens import HelpScreen, ModelPickerScreen, SettingsScreen
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import PromptInput
from mlx_mixtral.catalog.local import LocalModel
from mlx_mixtral.generation.sampling import SamplingParams

SIZE = (110, 34)
SMALL, LARGE = (80, 24), (120, 40)
MODELS = [
    LocalModel("/home/me/models/Mixtral-8x7B-Instruct-v0.1-mixed-3-4-with-a-long-name",
               "local", 20_400_000_000, 20_500_000_000),
    LocalModel("mlx-community/Mistral-7B-Instruct-v0.3-4bit", "hugging face", 4_080_000_000,
               4_100_000_000),
    LocalModel("ollama:mixtral:8x7b", "ollama", 26_400_000_000, 29_000_000_000),
    LocalModel("demo", "demo", 98_400_000, 115_200_000),
]


def make_app(tmp_path: Path, moe: bool = True) -> ChatApp:
    engine = FakeEngine(moe=moe, models=ModelList(MODELS, available=24_000_000_000))
    return ChatApp(engine, "fake-mixtral", Store(tmp_path / "chats.db"),
                   settings=SamplingParams(temperature=0.7, max_tokens=256, seed=42))


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.info is not None)
    pilot.app.query_one(PromptInput).cursor_blink = False  # a blinking cursor is a coin toss
    pilot.app.clear_notifications()
    await settle(pilot)


async def chat_once(pilot) -> None:
    app = pilot.app
    await ready(pilot)
    app.query_one(PromptInput).text = "Say hello and show me some code."
    app.query_one(PromptInput).focus()
    done = app.replies_done
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.replies_done > done)
    app.clear_notifications()
    await settle(pilot)


@pytest.mark.parametrize("size", [SIZE, SMALL], ids=["normal", "small"])
def test_main_screen(snap_compare, tmp_path, size):
    assert snap_compare(make_app(tmp_path, moe=False), terminal_size=size, run_before=chat_once)


def test_experts_panel(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=chat_once)


def open_screen(key: str, kind: type):
    """A `run_before` that presses `key` and waits for the `kind` modal, cursors still."""

    async def run(pilot) -> None:
        await ready(pilot)
        await pilot.press(key)
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, kind))
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False
        await settle(pilot)

    return run


@pytest.mark.parametrize(("key", "kind", "size"), [
    ("f3", SettingsScreen, SIZE), ("f1", HelpScreen, SIZE),
    ("f3", SettingsScreen, SMALL), ("f1", HelpScreen, SMALL),
    ("ctrl+o", ModelPickerScreen, SMALL), ("ctrl+o", ModelPickerScreen, LARGE),
], ids=["settings", "help", "settings-small", "help-small", "picker-small", "picker-large"])
def test_modal_screen(snap_compare, tmp_path, key, kind, size):
    assert snap_compare(make_app(tmp_path), terminal_size=size, run_before=open_screen(key, kind))
