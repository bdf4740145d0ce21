"""The conversation store under faults: two app instances on one file, SIGKILL at random
moments of a streaming chat, and schema migrations that apply whole or not at all."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from app_helpers import tiny_model_folder

from mlx_mixtral.app import store as store_module
from mlx_mixtral.app.store import SCHEMA_VERSION, Store, StoreError

DRIVER = Path(__file__).with_name("chat_driver.py")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-mixtral"))


def driver(model: Path, db: Path, tag: str, rounds: int, max_tokens: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(model), str(db), tag, str(rounds), str(max_tokens)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go(proc: subprocess.Popen) -> None:
    """Once the driver is ready (model loaded), let it start sending."""
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() else "")
    proc.stdin.write("go\n")
    proc.stdin.flush()


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0]


def complete_messages(db: Path) -> dict[int, tuple[str, str]]:
    with sqlite3.connect(db, timeout=30) as c:
        rows = c.execute("SELECT id, role, content FROM messages WHERE status = 'complete'")
        return {i: (role, content) for i, role, content in rows}


@pytest.mark.slow
def test_two_app_instances_share_one_database(model_folder, tmp_path):
    db = tmp_path / "shared.db"
    rounds = 5
    procs = [driver(model_folder, db, tag, rounds, 30) for tag in ("alpha", "beta")]
    for proc in procs:
        go(proc)
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.split("\n")[-2] == f"replied {rounds - 1}"
    assert integrity(db) == "ok"
    store = Store(db)
    try:
        conversations = store.list()
        assert len(conversations) == 2
        for c in conversations:
            messages = store.load(c.id).messages
            assert [m.status for m in messages] == ["complete"] * 2 * rounds
            assert [m.role for m in messages] == ["user", "assistant"] * rounds
            tag = messages[0].content.split()[0]
            assert [m.content for m in messages[::2]] == [f"{tag} message {i}"
                                                          for i in range(rounds)]
            assert all(m.content for m in messages[1::2])
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.alone  # replies must complete within the kills' windows
def test_sigkill_at_10_random_moments_of_a_streaming_chat(model_folder, tmp_path, request):
    db = tmp_path / "killed.db"
    rng = random.Random(8)
    seen: dict[int, tuple[str, str]] = {}
    mid_reply = interrupted = 0
    # Each driver starts (imports, loads the model) while the one before runs, as a second app
    # instance would: a start costs more than the kill windows, and until go() the driver only
    # holds the database open.
    upcoming = driver(model_folder, db, "run0", 10_000, 30)
    request.addfinalizer(upcoming.kill)
    for kill in range(10):
        proc = upcoming
        go(proc)
        if kill < 9:
            upcoming = driver(model_folder, db, f"run{kill + 1}", 10_000, 30)
            request.addfinalizer(upcoming.kill)  # (if this test fails before its turn)
        deadline = time.monotonic() + rng.uniform(0.0, 3.0)
        while time.monotonic() < deadline:  # what was complete just before the kill
            seen.update(complete_messages(db))
            time.sleep(0.05)
        seen.update(complete_messages(db))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
        assert integrity(db) == "ok"
        after = complete_messages(db)
        lost = {i: m for i, m in seen.items() if after.get(i) != m}
        assert not lost, f"kill {kill} lost completed messages: {lost}"
        with sqlite3.connect(db) as c:  # a reply cut off by this kill stays 'streaming'
            streaming = c.execute("SELECT count(*) FROM messages WHERE status = 'streaming'"
                                  ).fetchone()[0]
        mid_reply += streaming > interrupted
        interrupted = streaming
    replies = sum(role == "assistant" for role, _ in seen.values())
    assert replies >= 5  # replies did complete between the kills (user messages not counted)
    assert mid_reply >= 3  # and kills did land in the middle of replies
    print(f"\n10 kills: {replies} completed replies kept, {mid_reply} kills mid-reply")


# ---- migrations --------------------------------------------------------------------------


def test_migrations_upgrade_in_place_and_refuse_newer_files(tmp_path, monkeypatch):
    db = tmp_path / "chats.db"
    store = Store(db)
    cid = store.create("model", None, {})
    store.add_message(cid, "user", "kept across the upgrade")
    store.close()
    v2 = "ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, v2])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = Store(db)
    assert store.load(cid).messages[0].content == "kept across the upgrade"
    assert store.db.execute("SELECT pinned FROM conversations").fetchone() == (0,)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    store.close()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="newer mlx-mixtral"):
        Store(db)


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    db = tmp_path / "chats.db"
    Store(db).close()
    broken = "ALTER TABLE conversations ADD COLUMN a INTEGER; ALTER TABLE nowhere ADD b INTEGER"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, broken])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="no such table"):
        Store(db)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        columns = [r[1] for r in c.execute("PRAGMA table_info(conversations)")]
    assert "a" not in columns


def test_instances_starting_together_on_a_new_file(tmp_path):
    db = tmp_path / "new.db"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            Store(db).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert integrity(db) == "ok"
