"""The disk tier: one file per block, written once and never rewritten.

A block is written to a hidden partial file, flushed to the disk, and renamed to its key: a
reader sees it whole or not at all, also after a crash. Its file ends with a SHA-256 of what
precedes it, so a damaged or truncated file is found, logged once, deleted and recomputed, never
used. The least recently used files (by modification time: a read touches it) go first when the
folder outgrows its budget. Several processes may share the folder: each looks at the files
themselves, not at a list of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..user_files import writer_alive
from .blocks import Block
from .folder import BLOCK_SUFFIX as SUFFIX

log = logging.getLogger("mlx_mixtral.prefixes")

TRAILER = b"MXKVBLK1"  # then the SHA-256 of the bytes before it
_DIGEST = 32
PARTIAL_AGE = 3600.0  # seconds after which a partial file's writer is surely gone
_WRITING: set[str] = set()  # names of the partial files this process is writing (any thread)


@dataclass(frozen=True)
class FileInfo:
    path: Path
    size: int
    used: float


class DiskTier:
    def __init__(self, folder: Path, budget: int) -> None:
        self.folder, self.budget = folder, budget
        self.evicted = 0
        self.dropped = 0  # damaged files found and deleted
        self.written = 0  # bytes written by this process
        self.failed = 0  # writes that failed (a full or read-only disk)
        self.failing = False
        if budget > 0:
            self._sweep_partials()

    def path(self, space: str, key: str) -> Path:
        return self.folder / space / f"{key}{SUFFIX}"

    def has(self, space: str, key: str) -> bool:
        return self.budget > 0 and self.path(space, key).is_file()

    def read(self, space: str, key: str) -> Block | None:
        """The block, or None when it is absent or damaged (then deleted, with a log line)."""
        path = self.path(space, key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        body, mark, digest = data[:-len(TRAILER) - _DIGEST], data[-len(TRAILER) - _DIGEST:
                                                                 -_DIGEST], data[-_DIGEST:]
        if mark != TRAILER or hashlib.sha256(body).digest() != digest:
            return self._drop(path, "its checksum does not match (damaged or truncated)")
        try:
            arrays = mx.load(io.BytesIO(body), format="safetensors")
        except (RuntimeError, ValueError, OSError) as e:
            return self._drop(path, f"unreadable ({e})")
        with contextlib.suppress(OSError):
            os.utime(path)  # just used
        return Block(arrays, sum(x.nbytes for x in arrays.values()))

    def _drop(self, path: Path, why: str) -> None:
        log.warning("prefix store: dropped block %s: %s", path.name, why)
        self.dropped += 1
        path.unlink(missing_ok=True)
        return None

    def write(self, space: str, key: str, block: Block) -> None:
        if self.budget <= 0 or block.nbytes > self.budget:
            return
        path = self.path(space, key)
        if path.exists():
            return  # written already (by us or another process): blocks never change
        buffer = io.BytesIO()
        mx.save_safetensors(buffer, block.arrays)
        body = buffer.getvalue()
        partial = path.with_name(f".{key}.{os.getpid()}.partial")
        _WRITING.add(partial.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                f.write(body)
                f.write(TRAILER + hashlib.sha256(body).digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as e:  # a full or read-only disk costs the disk tier, never a reply
            self.cannot_write(e)
            return
        finally:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            _WRITING.discard(partial.name)
        self.failing = False
        self.written += len(body) + len(TRAILER) + _DIGEST

    def cannot_write(self, error: OSError) -> None:
        if not self.failing:  # one line until a write succeeds again
            log.warning("prefix store: cannot write blocks to %s (%s); they are kept in RAM "
                        "only", self.folder, error.strerror or error)
        self.failing = True
        self.failed += 1

    def touch(self, space: str, key: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(space, key))

    def remove(self, space: str, key: str) -> int:
        path = self.path(space, key)
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return 0
        return size

    def files(self) -> list[FileInfo]:
        """Every block file, least recently used first."""
        found = []
        for path in self.folder.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append(FileInfo(path, st.st_size, st.st_mtime))
        return sorted(found, key=lambda f: f.used)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files())

    def evict(self) -> None:
        """Delete the least recently used files until the rest fit in the budget."""
        files = self.files()
        total = sum(f.size for f in files)
        for f in files:
            if total <= self.budget:
                break
            with contextlib.suppress(OSError):
                f.path.unlink()
                self.evicted += 1
            total -= f.size

    def _sweep_partials(self) -> None:
        """Partial files of writers that are gone (killed mid-write): never used, deleted."""
        now = time.time()
        for path in self.folder.glob("*/.*.partial"):
            if path.name in _WRITING:
                continue  # another store of this process is writing it
            pid = path.name.split(".")[-2]
            with contextlib.suppress(OSError, ValueError):
                if not _alive(int(pid)) or now - path.stat().st_mtime > PARTIAL_AGE:
                    path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # not one being written (_WRITING): a previous process's with our pid
    return writer_alive(pid)
