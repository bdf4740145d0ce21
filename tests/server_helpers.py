"""A real `mlx-mixtral serve` process on a free loopback port, for the server tests. Each has a
data folder of its own (its prefix store starts empty) unless one is given (a restart)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mistral_common
from conftest import build_hf

V3_TOKENIZER = Path(mistral_common.__file__).parent / "data" / \
    "mistral_instruct_tokenizer_240323.model.v3"


# Tokens per prefix-store block for the servers of the tests that check reuse: prompts are
# reused in whole blocks, and theirs are short.
TEST_BLOCK = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, model: str | None = None, startup: float = 180,
                 data: Path | None = None, launcher: tuple[str, ...] = ()) -> None:
        """`launcher`: a script that runs the command line in place of `python -m
        mlx_mixtral.cli` (with its own arguments first)."""
        # (a fresh folder within the session's private data folder, see conftest.py)
        self.data = data or Path(tempfile.mkdtemp(prefix="serve-", dir=os.environ.get(
            "MLX_MIXTRAL_DATA_DIR")))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, *(launcher or ("-m", "mlx_mixtral.cli")), "serve", "--port",
                str(self.port),
                "--log-level", "warning", *flags]
        if model is not None:
            argv += ["--model", model]
        self.log = open(os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "MLX_MIXTRAL_DATA_DIR": str(self.data)})
        deadline = time.monotonic() + startup
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("serve did not answer /health in time")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self, sig: int = signal.SIGINT) -> str:
        """Stop the server (as Ctrl-C would); its stderr. It must end cleanly: exit 0, no
        abort."""
        running = self.proc.poll() is None
        if running:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = self.proc.stderr.read()
        self.log.close()
        if running:
            assert self.proc.returncode == 0 and "terminate called" not in err, \
                (self.proc.returncode, err[-2000:])
        return err


def scrape(server: Server, key: str | None = None) -> dict[str, float]:
    """Every sample of /metrics, read with prometheus_client's parser, by name and labels:
    'name{label=value,...}' -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(server.url + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def tiny_v3_mixtral(folder: Path) -> Path:
    """A random tiny Mixtral with the real Mistral v3 tokenizer (control tokens for [INST] and
    tools): garbage text, real formats."""
    build_hf(folder, "mixtral", vocab_size=32768, num_local_experts=4, num_experts_per_tok=2,
             max_position_embeddings=1024)
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model")
    return folder


def serve_tiny_v3(tmp_path_factory, *flags: str) -> Iterator[Server]:
    """A module fixture's body: `serve` with `flags` over a fresh tiny v3 Mixtral (prompts kept
    in blocks of TEST_BLOCK tokens), stopped (and checked to stop cleanly) after the module."""
    folder = tiny_v3_mixtral(tmp_path_factory.mktemp("tiny-v3"))
    server = Server("--cache-block", str(TEST_BLOCK), *flags, model=str(folder))
    server.folder = folder
    yield server
    server.stop()


# Experts are almost all of it (as in Mixtral): at 40% of its size it pages 3 of 12 experts per
# layer and has a few MB left for kept caches. Word-level tokens t1..t127 (t2 ends a reply).
PAGED = dict(model_type="mixtral", vocab_size=128, hidden_size=256, intermediate_size=4096,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
             num_local_experts=12, num_experts_per_tok=2, max_position_embeddings=4096,
             rope_theta=1e4)


def paged_mixtral(root: Path) -> Path:
    """A random 4-bit Mixtral (MLX folder, about 95 MB) whose experts can be paged."""
    import mlx.core as mx
    from conftest import tiny_tokenizer

    from mlx_mixtral.convert import convert
    from mlx_mixtral.convert.synthetic import write_hf_checkpoint
    from mlx_mixtral.model.config import ModelArgs

    write_hf_checkpoint(root / "hf", ModelArgs.from_dict(PAGED), dtype=mx.bfloat16)
    tiny_tokenizer().save_pretrained(root / "hf")
    convert(root / "hf", root / "q4", quantize=True, q_bits=4, progress=False)
    return root / "q4"


def peak_rss(pid: int) -> tuple[int, int]:
    """(resident now, resident at most so far) of a process, in bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
