"""End to end: the installed `mlx-mixtral chat` in tmux, and a SIGKILL while it streams."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid

import pytest
from app_helpers import tiny_model_folder

from mlx_mixtral import load
from mlx_mixtral.generation.session import ChatSession

EXE = shutil.which("mlx-mixtral")
# Locally a missing tmux skips these; in CI (CI=true, where .ci/run installs tmux) it fails.
# alone: deadlines (the demo's chat within 15 s) and kills while it streams.
pytestmark = [pytest.mark.slow, pytest.mark.alone, pytest.mark.skipif(
    (not shutil.which("tmux") or not EXE) and not os.environ.get("CI"),
    reason="needs tmux and the installed mlx-mixtral command")]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-mixtral"))


class Tmux:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.name = f"mlxm-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        # Test plugins export COLUMNS/LINES, which Textual would obey over the pane's size.
        line = f"env -u COLUMNS -u LINES {exports} " + " ".join(command)
        # Size the window first (detached, tmux would size it for no client), then start the
        # app in it, so that it starts at 130x40.
        for cmd in (["new-session", "-d", "-s", self.name, "-x", "130", "-y", "40", "sleep 600"],
                    ["set-option", "-t", self.name, "window-size", "manual"],
                    ["resize-window", "-t", self.name, "-x", "130", "-y", "40"],
                    ["respawn-pane", "-k", "-t", self.name, line]):
            subprocess.run(["tmux", *cmd], check=True, capture_output=True)

    def screen(self) -> str:
        result = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                                capture_output=True, text=True)
        return result.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name],
                              capture_output=True).returncode == 0

    def wait_for(self, predicate, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out; the screen was:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def chat(model_folder, db, *flags: str) -> Tmux:
    return Tmux([EXE, "chat", "--model", str(model_folder), "--db", str(db), *flags],
                {"TERM": "xterm-256color", "COLORTERM": "truecolor"})


def loaded(screen: str) -> bool:
    """The status bar shows the model's context once it is loaded (nothing before)."""
    return re.search(r"│ (context|window) \d+", screen) is not None


def test_chat_in_tmux_streams_quits_and_remembers(model_folder, tmp_path):
    db = tmp_path / "chats.db"
    model, tokenizer = load(model_folder)
    expected = list(ChatSession(model, tokenizer, temperature=0, max_tokens=12)
                    .send("hello world"))[-1].text
    words = re.findall(r"\w{3,8}", expected)  # short: a long word may wrap in the pane
    assert words, expected
    app = chat(model_folder, db, "--temp", "0", "--max-tokens", "12")
    try:
        app.wait_for(loaded)
        app.keys("hello world")
        app.keys("Enter")
        app.wait_for(lambda s: words[0] in s)  # the streamed reply, read from the pane
        app.keys("C-q")
        deadline = time.time() + 30
        while app.alive() and time.time() < deadline:
            time.sleep(0.2)
        assert not app.alive()
    finally:
        app.kill()
    again = chat(model_folder, db)
    try:
        again.wait_for(lambda s: loaded(s) and "hello world" in s)  # listed in the sidebar
    finally:
        again.kill()


def python_pids(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def test_sigkill_while_streaming_keeps_the_database(model_folder, tmp_path):
    db = tmp_path / f"kill-{uuid.uuid4().hex[:6]}.db"
    app = chat(model_folder, db, "--temp", "1", "--max-tokens", "3000")
    try:
        app.wait_for(loaded)
        app.keys("first message")
        app.keys("Enter")
        deadline = time.time() + 60
        partial = None
        while time.time() < deadline:  # wait for a reply saved in flight
            with sqlite3.connect(db) as c:
                partial = c.execute("SELECT content FROM messages WHERE role = 'assistant' "
                                    "AND status = 'streaming' AND content != ''").fetchone()
            if partial:
                break
            time.sleep(0.1)
        assert partial, "no in-flight reply was saved"
        pids = python_pids(str(db))
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        app.kill()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = c.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    assert rows[0] == ("user", "first message", "complete")
    assert rows[1][0] == "assistant" and rows[1][1]  # the streamed part up to the last save
    again = chat(model_folder, db)
    try:
        again.wait_for(lambda s: loaded(s) and "first message" in s)
    finally:
        again.kill()


def test_first_start_offline_opens_the_demo_quickly(tmp_path):
    """No model named or configured, no network: the demo model's chat is up within 15 s."""
    start = time.time()
    app = Tmux([EXE, "chat"], {"TERM": "xterm-256color", "MLX_MIXTRAL_MODEL": "",
                               "MLX_MIXTRAL_CONFIG_DIR": str(tmp_path / "config"),
                               "MLX_MIXTRAL_DATA_DIR": str(tmp_path / "data"),
                               "HF_HUB_OFFLINE": "1"})
    try:
        screen = app.wait_for(lambda s: loaded(s) and "— demo" in s, timeout=15)
        assert time.time() - start < 15, screen
    finally:
        app.kill()
