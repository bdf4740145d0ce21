"""Commands under `mlx.launch`: one model split over several ranks (machines, or processes).

Every rank runs the same command. They join MLX's group, agree on what only rank 0 knows (a
prompt piped into it, a random seed), split the model, and compute the same tokens; rank 0 alone
prints. A watchdog ends a rank that hears nothing from the others for `--dist-timeout` seconds
(a rank died, the network went away) with one line, instead of a hang.
"""

from __future__ import annotations

import atexit
import os
import secrets
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..errors import DistributedError

if TYPE_CHECKING:  # MLX is imported when a group is joined, not for --help
    import mlx.core as mx

EXIT_LOST = 1
DEFAULT_TIMEOUT = 60.0


def filter_ring_noise() -> int:
    """Route this process's stderr (fd 2, where MLX's C++ writes too) through a thread that
    drops the ring backend's own socket chatter, so a lost rank ends in our one line. Returns a
    descriptor of the real stderr."""
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not line.startswith(b"[ring]"):
                    os.write(real, line)

    thread = threading.Thread(target=pump, daemon=True, name="stderr-filter")
    thread.start()

    def drain() -> None:  # at exit: the last line (our error) must get through
        sys.stderr.flush()
        os.close(2)  # the pipe's only writer: the pump sees its end
        thread.join(timeout=2)

    atexit.register(drain)
    # Python's own writes skip the filter: they reach the terminal in order, at once.
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1)
    return real


def launched() -> bool:
    """Started by `mlx.launch` (ring or jaccl backends) or by mpirun."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


class Watchdog:
    """Ends the process when `beat()` has not been called for `timeout` seconds while armed."""

    def __init__(self, timeout: float, what: str, stderr: int = 2) -> None:
        self.timeout, self.what, self.stderr = timeout, what, stderr
        self.deadline: float | None = None
        self.rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def beat(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def stop(self) -> None:
        self.deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 10))
            if self.deadline is not None and time.monotonic() > self.deadline:
                message = (f"mlx-mixtral: error: rank {self.rank}: nothing from the other ranks "
                           f"for {self.timeout:g} s while {self.what} (a rank stopped, or the "
                           "network failed); stopping (--dist-timeout sets the wait)\n")
                os.write(self.stderr, message.encode())
                os._exit(EXIT_LOST)


def join(timeout: float) -> tuple[mx.distributed.Group, Watchdog]:
    """The group of all ranks, once every rank has answered (or one line within `timeout`)."""
    import mlx.core as mx

    dog = Watchdog(timeout, "forming the group", filter_ring_noise())
    dog.beat()
    group = mx.distributed.init(strict=True)
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # every rank is here
    dog.stop()
    dog.what = "generating"
    return group, dog


def share_text(text: str | None, group: mx.distributed.Group) -> str:
    """Rank 0's text on every rank (other ranks pass None)."""
    import mlx.core as mx
    import numpy as np

    data = np.frombuffer((text or "").encode("utf-8"), dtype=np.uint8) if group.rank() == 0 \
        else np.zeros(0, dtype=np.uint8)
    n = int(mx.distributed.all_sum(mx.array(len(data)), group=group).item())
    buffer = np.zeros(n, dtype=np.int32)
    buffer[:len(data)] = data
    shared = mx.distributed.all_sum(mx.array(buffer), group=group)
    return bytes(np.array(shared).astype(np.uint8)).decode("utf-8", "replace")


def share_seed(seed: int | None, group: mx.distributed.Group) -> int:
    """The seed every rank samples with: the one given, else a random one from rank 0. Ranks
    that sampled with different seeds would choose different tokens and part ways."""
    import mlx.core as mx

    if seed is not None:
        return seed
    mine = secrets.randbelow(2**31) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group).item())


def quiet_unless_first(group: mx.distributed.Group) -> None:
    """Only rank 0 prints the reply; the others' stdout goes nowhere (their errors still reach
    stderr)."""
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def add_distributed_flags(p) -> None:
    p.add_argument("--pipeline", action="store_true",
                   help="under mlx.launch: split the model by layers (fewer, larger messages: "
                   "better over Ethernet) instead of tensor parallel (every layer split)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="under mlx.launch: seconds without word from the other ranks before a "
                   "rank gives up with an error")


def lost(error: RuntimeError, group: mx.distributed.Group) -> DistributedError:
    """The one-line error for a collective that failed because a peer went away."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DistributedError(f"rank {group.rank()}: lost the other ranks ({reason}); a rank "
                            "stopped or the network failed")
