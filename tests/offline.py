"""No network for what a test runs, beyond loopback: a process-wide audit hook that refuses
name lookups and connections to any other host while `refusing_the_network()` is on, and keeps
what it refused so that the test fails on it.

Clients of other servers fetch things on their own (litellm a model cost map, tiktoken its BPE
files); CI has no network, so such a fetch is a hang or a silent fallback there. Refused at
once, it is an OSError the client sees, and a failed test that names the host. Audit hooks
cannot be removed: this one does nothing while off, so other tests in the same worker are
untouched. `python -c GUARDED_MAIN` runs a module's command (`python -m`) under the same hook.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
refused: list[str] = []
_state = {"on": False, "installed": False}


def _host(event: str, args: tuple) -> str | None:
    """The remote host a socket event is about (None: no host, or not a network event)."""
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):  # (an AF_UNIX path: local)
        host = args[1][0]
    else:
        return None
    return host.decode() if isinstance(host, bytes) else host


def _hook(event: str, args: tuple) -> None:
    if not _state["on"]:
        return
    host = _host(event, args)
    if host is not None and host not in LOOPBACK:
        refused.append(f"{event} {host}")
        raise ConnectionRefusedError(f"the tests are offline: {event} {host} refused")


def refuse_the_network() -> None:
    """Turn the hook on for the rest of this process."""
    if not _state["installed"]:
        sys.addaudithook(_hook)
        _state["installed"] = True
    _state["on"] = True


@contextmanager
def refusing_the_network() -> Iterator[list[str]]:
    """The hook on within the block; yields the list of what it refused there."""
    start = len(refused)
    refuse_the_network()
    seen: list[str] = []
    try:
        yield seen
    finally:
        _state["on"] = False
        seen.extend(refused[start:])


# `python -c GUARDED_MAIN MODULE ARGS...`: `python -m MODULE ARGS...` under the hook (this
# folder on PYTHONPATH).
GUARDED_MAIN = ("import runpy, sys, offline; offline.refuse_the_network(); "
                "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', "
                "alter_sys=True)")
