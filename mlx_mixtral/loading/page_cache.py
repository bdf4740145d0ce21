"""The operating system's page cache and the weight files: dropping them from it, so that a
benchmark reads from the disk as a Mac with less memory than the model must.

On Linux `posix_fadvise(DONTNEED)` drops a file's (or a range's) cached pages. macOS has no
such call: a reader's handle can bypass the cache (`F_NOCACHE`), and pages already cached
leave only with `sudo purge`, which the benchmark tells its user.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PURGE_NOTE = ("macOS keeps files read before in its page cache and has no call to drop one: "
              "for cold reads run `sudo purge` before bench (the expert reads themselves bypass "
              "the cache)")


def can_drop() -> bool:
    """Whether this system drops a file's pages on request (Linux)."""
    return hasattr(os, "posix_fadvise")


def drop_range(fd: int, offset: int, length: int) -> None:
    """Drop these bytes of an open file from the page cache (where the system can)."""
    if can_drop():
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def drop_files(paths: list[Path]) -> bool:
    """Drop whole files from the page cache; False where the system cannot (macOS)."""
    if not can_drop():
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # pages not yet written back (a file just converted) stay otherwise
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def bypass_cache(fd: int, on: bool) -> None:
    """Reads through `fd` skip the page cache: macOS's F_NOCACHE; on Linux no read-ahead
    (`POSIX_FADV_RANDOM`: the kernel would otherwise read the next expert's bytes too and
    leave them cached, a warm read next time), and the reader drops each range after reading
    it."""
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_NOCACHE, int(on))
    elif can_drop():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if on else os.POSIX_FADV_NORMAL)


def disk_read_bytes() -> int | None:
    """Bytes this process has had read from storage so far (Linux's /proc/self/io), or None."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return None
