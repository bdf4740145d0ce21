"""Conversations in SQLite (WAL), in the user data folder.

Each message is written as soon as it is complete; the reply being streamed is written every
second or so with status 'streaming', so a crash loses at most its last second. The schema is
versioned with `PRAGMA user_version`, and `MIGRATIONS` bring an older file up to date.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError

MIGRATIONS = [
    # version 1
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        system TEXT,
        settings TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete'
            CHECK (status IN ('complete', 'streaming', 'stopped')),
        stats TEXT,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
    # version 2: when the system prompt was last set (NULL: with the chat's first message)
    """
    ALTER TABLE conversations ADD COLUMN system_set REAL;
    """,
    # version 3: what the prefix store needs of a chat, per model (its fingerprint): the token
    # ids its replies were generated as ([[text, ids], ...]) and the keys of its blocks; a
    # deleted chat's keys wait in freed_blocks until an engine of that model frees them.
    """
    CREATE TABLE chat_prefixes (
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        replies TEXT NOT NULL DEFAULT '[]',
        blocks TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (conversation_id, model)
    );
    CREATE TABLE freed_blocks (
        model TEXT NOT NULL,
        blocks TEXT NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    """A migration's statements (executescript would commit the open transaction)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def default_path() -> Path:
    """conversations.db in the user data folder ($MLX_MIXTRAL_DATA_DIR moves it)."""
    from ..user_files import data_dir

    return data_dir() / "conversations.db"


@dataclass
class Message:
    id: int
    role: str
    content: str
    status: str = "complete"
    stats: dict[str, Any] | None = None
    created: float = 0.0


@dataclass
class SavedChat:
    """A chat as the store keeps it (the open one is `conversation.Conversation`)."""

    id: int
    title: str
    model: str
    system: str | None
    settings: dict[str, Any]
    updated: float
    messages: list[Message] = field(default_factory=list)
    created: float = 0.0
    system_set: float | None = None  # set after the chat began: replies before it lacked it


class Store:
    """Several app instances may share one file: SQLite serialises their writes (WAL, and a
    busy timeout so that a writer waits for the other instead of failing)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The generation worker and the UI both write: one connection, serialised by
            # SQLite.
            self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                      isolation_level=None)
            self._enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA secure_delete=ON")  # a deleted chat's text is overwritten
            self._migrate()
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(f"{self.path}: cannot open the conversation database ({e}); "
                             "move it aside or pass --db with another file") from None

    def _enable_wal(self) -> None:
        """WAL mode (it persists in the file). Switching to it takes a lock that SQLite's busy
        timeout does not wait for, so instances starting together on a new file retry."""
        for attempt in range(100):
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.05)

    def _migrate(self) -> None:
        # Read the version inside the write transaction: two instances starting on a new file
        # must not both create the tables.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer mlx-mixtral (schema "
                                 f"{version}, this one knows {SCHEMA_VERSION}); upgrade "
                                 "mlx-mixtral or pass --db with another file")
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number + 1}")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # ---- conversations --------------------------------------------------------------------

    def create(self, model: str, system: str | None, settings: dict[str, Any],
               title: str = "New chat") -> int:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO conversations (title, model, system, settings, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)", (title, model, system, json.dumps(settings), now, now))
        return int(cur.lastrowid)

    def update(self, conversation_id: int, **fields: Any) -> None:
        allowed = {"title", "model", "system", "settings"}
        values = {k: json.dumps(v) if k == "settings" else v for k, v in fields.items()
                  if k in allowed}
        if "system" in values:
            values["system_set"] = time.time()
        if not values:
            return
        assignments = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE conversations SET {assignments}, updated = ? WHERE id = ?",
                        (*values.values(), time.time(), conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self._transaction():  # its blocks are freed later, by an engine of their model
            self.db.execute("INSERT INTO freed_blocks (model, blocks) SELECT model, blocks "
                            "FROM chat_prefixes WHERE conversation_id = ?", (conversation_id,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        # The log still holds the chat's pages as they were: write them back (zeroed, by
        # secure_delete) and empty it, so that no byte of the chat stays on disk.
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    _COLUMNS = "id, title, model, system, settings, updated, created, system_set"

    @staticmethod
    def _conversation(r: tuple) -> SavedChat:
        return SavedChat(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], created=r[6],
                            system_set=r[7])

    def list(self) -> list[SavedChat]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations "
                               "ORDER BY updated DESC, id DESC").fetchall()
        return [self._conversation(r) for r in rows]

    def search(self, text: str) -> list[SavedChat]:
        """Chats whose title or messages contain `text` (any case), newest first."""
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        rows = self.db.execute(
            f"SELECT {self._COLUMNS} FROM conversations c WHERE title LIKE ?1 ESCAPE '\\' "
            "OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id "
            "AND m.content LIKE ?1 ESCAPE '\\') ORDER BY updated DESC, id DESC",
            (pattern,)).fetchall()
        return [self._conversation(r) for r in rows]

    def load(self, conversation_id: int) -> SavedChat | None:
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        if row is None:
            return None
        conversation = self._conversation(row)
        conversation.messages = [
            Message(m[0], m[1], m[2], m[3], json.loads(m[4]) if m[4] else None, m[5])
            for m in self.db.execute(
                "SELECT id, role, content, status, stats, created FROM messages "
                "WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        ]
        return conversation

    # ---- messages -------------------------------------------------------------------------

    def add_message(self, conversation_id: int, role: str, content: str,
                    status: str = "complete", stats: dict[str, Any] | None = None) -> int:
        with self._transaction():
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, stats, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, json.dumps(stats) if stats else None,
                 time.time()))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?",
                            (time.time(), conversation_id))
        return int(cur.lastrowid)

    def update_message(self, message_id: int, content: str, status: str,
                       stats: dict[str, Any] | None = None) -> None:
        self.db.execute("UPDATE messages SET content = ?, status = ?, stats = ? WHERE id = ?",
                        (content, status, json.dumps(stats) if stats else None, message_id))

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    # ---- what the prefix store keeps of chats (app/chat_prefixes.py) ------------------------

    def prefix_replies(self, conversation_id: int, model: str) -> list[list]:
        """The chat's replies as [text, token ids] for `model` ([] if none are kept)."""
        row = self.db.execute("SELECT replies FROM chat_prefixes WHERE conversation_id = ? AND "
                              "model = ?", (conversation_id, model)).fetchone()
        return _json_list(row[0]) if row else []

    def keep_prefix(self, conversation_id: int, model: str, replies: list[list],
                    blocks: list[str]) -> bool:
        """Keep the chat's replies (as `replies`) and add `blocks` to its block keys; False if
        the chat is gone (deleted meanwhile)."""
        try:
            with self._transaction():
                row = self.db.execute("SELECT blocks FROM chat_prefixes WHERE conversation_id = "
                                      "? AND model = ?", (conversation_id, model)).fetchone()
                known = _json_list(row[0]) if row else []
                union = known + [k for k in dict.fromkeys(blocks) if k not in set(known)]
                self.db.execute(
                    "INSERT INTO chat_prefixes (conversation_id, model, replies, blocks) VALUES "
                    "(?, ?, ?, ?) ON CONFLICT (conversation_id, model) DO UPDATE SET "
                    "replies = excluded.replies, blocks = excluded.blocks",
                    (conversation_id, model, json.dumps(replies), json.dumps(union)))
        except sqlite3.IntegrityError:  # the chat was deleted
            return False
        return True

    def kept_blocks(self) -> set[str]:
        """Every block key a stored chat uses (any model's)."""
        return {k for (blocks,) in self.db.execute("SELECT blocks FROM chat_prefixes")
                for k in _json_list(blocks)}

    def take_freed_blocks(self, model: str) -> list[str]:
        """The block keys of `model` that deleted chats left, now the caller's to free."""
        with self._transaction():
            rows = self.db.execute("SELECT blocks FROM freed_blocks WHERE model = ?",
                                   (model,)).fetchall()
            self.db.execute("DELETE FROM freed_blocks WHERE model = ?", (model,))
        return [k for (blocks,) in rows for k in _json_list(blocks)]


def _json_list(text: str) -> list:
    """A JSON list kept in a column ([] if it is not one: nothing of it is trusted)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []
