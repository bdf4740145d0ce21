"""Commands under `mlx.launch`: one model split over several ranks (machines, or processes).

Every rank runs the same command. They join MLX's group, agree on what only rank 0 knows (a
prompt piped into it, a random seed), split the model, and compute the same tokens; rank 0 alone
prints. A watchdog ends a rank that hears nothing from the others for `--dist-timeout` seconds
(a rank died, the network went away) with one line, instead of a hang. Under `serve`, rank 0
alone serves HTTP and announces each request to the others (generation/lockstep.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING

from ..errors import ConfigError, DistributedError

if TYPE_CHECKING:  # MLX is imported when a group is joined, not for --help
    import mlx.core as mx

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


# The watchdog runs in its own small process: MLX may block in C++ while holding the GIL
# (forming the ring group does), where no Python thread of ours would ever run again.
WATCHER = """
import os, select, signal, sys
parent, timeout, rank = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
what, armed = "forming the group", False
while True:
    ready, _, _ = select.select([0], [], [], timeout if armed else None)
    if not ready:
        os.write(2, (f"mlx-mixtral: error: rank {rank}: nothing from the other ranks for "
                     f"{timeout:g} s while {what} (a rank stopped, or the network failed); "
                     "stopping (--dist-timeout sets the wait)\\n").encode())
        os.kill(parent, signal.SIGKILL)
        sys.exit(0)
    data = os.read(0, 4096)
    if not data:
        sys.exit(0)  # the command ended
    for byte in data:
        if byte == ord("b"):
            armed = True
        elif byte == ord("s"):
            armed = False
        elif byte == ord("g"):
            what = "generating"
"""


class Watchdog:
    """Ends this process when `beat()` has not been called for `timeout` seconds while armed,
    after one line on stderr. The line is the watcher's; the process is killed."""

    def __init__(self, timeout: float, stderr: int = 2) -> None:
        import subprocess

        self.timeout = timeout
        rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
        self.watcher = subprocess.Popen(
            [sys.executable, "-c", WATCHER, str(os.getpid()), str(timeout), rank],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)

    def _say(self, byte: bytes) -> None:
        with contextlib.suppress(OSError):  # the watcher is gone: nothing to watch with
            os.write(self.watcher.stdin.fileno(), byte)

    def beat(self) -> None:
        self._say(b"b")

    def stop(self) -> None:
        self._say(b"s")

    def generating(self) -> None:
        self._say(b"g")


def join(timeout: float) -> tuple[mx.distributed.Group, Watchdog]:
    """The group of all ranks, once every rank has answered (or one line within `timeout`)."""
    import mlx.core as mx

    dog = Watchdog(timeout, filter_ring_noise())
    dog.beat()
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:  # MLX_RANK set by hand, or a launcher's environment half there
        dog.stop()
        raise ConfigError(  # the user's mistake (exit 2), not a lost rank
            f"MLX_RANK is set but no distributed backend could start ({e}): run the command "
            "under `mlx.launch -n 2 --backend ring ...` (which sets MLX_HOSTFILE too), or "
            "unset MLX_RANK to run alone") from None
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # every rank is here
    dog.stop()
    dog.generating()
    return group, dog


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
