"""A restart on `mlx-mixtral serve`: time to first token of a long system prompt, cold and after
the server was stopped and started again on the same prefix store (issue 24's acceptance).

Each run starts a server on a fresh data folder, asks a ~2,000-token system prompt plus a
question (cold: the whole prompt is prefilled), stops it, starts it again on the same folder
and asks the same system prompt with another question: the stored blocks come back from disk
and only the last partial block and the question are prefilled. Prints each run and the
medians as a table (or JSON); the times are the client's, from sending the request to the
first streamed token.

    python benchmarks/prefix_restart.py [--model demo] [--runs 3] [--system-tokens 2000]
        [--port 8094] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import httpx

QUESTIONS = ("Which rule names the number 7?", "Which rule names the number 42?")


@dataclass
class Run:
    prompt_tokens: int
    cold_ttft: float
    restart_ttft: float
    cached_tokens: int  # of the prompt after the restart

    @property
    def ratio(self) -> float:
        return self.restart_ttft / self.cold_ttft


def system_prompt(tokens: int, run: int) -> str:
    """About `tokens` tokens of rules (about 15 tokens each on SmolLM2's tokenizer), distinct
    for each run."""
    rules = " ".join(f"Rule {i}: be kind to the number {i}." for i in range(tokens // 15))
    return f"You keep the rules of session {run}. {rules}"


def start_server(model: str, port: int, data: str, *flags: str) -> subprocess.Popen:
    """`mlx-mixtral serve` on a loopback port, its data folder (the store) `data`, once it
    answers /health."""
    server = subprocess.Popen([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model",
                               model, "--port", str(port), "--log-level", "warning", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLX_MIXTRAL_DATA_DIR": data})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    server.wait(60)


def ask(port: int, system: str, question: str) -> tuple[float, int, int]:
    """(seconds to the first streamed token, prompt tokens, cached tokens) of one greedy
    request."""
    body = {"model": "x", "stream": True, "max_tokens": 4, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
    body["model"] = models["data"][0]["id"]
    start = time.perf_counter()
    ttft, usage = None, None
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if ttft is None and event.get("choices") and \
                    event["choices"][0]["delta"].get("content") is not None:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]
    if ttft is None or usage is None:
        raise SystemExit("the reply had no token or no usage")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ttft, usage["prompt_tokens"], cached


def one_run(model: str, port: int, tokens: int, run: int) -> Run:
    """Cold, stop, start again on the same store, warm."""
    system = system_prompt(tokens, run)
    with tempfile.TemporaryDirectory(prefix="prefix-restart-") as data:
        server = start_server(model, port, data)
        try:
            cold, prompt, _ = ask(port, system, QUESTIONS[0])
        finally:
            stop(server)
        server = start_server(model, port, data)
        try:
            warm, _, cached = ask(port, system, QUESTIONS[1])
        finally:
            stop(server)
    return Run(prompt, cold, warm, cached)


def table(runs: list[Run]) -> str:
    rows = ["| run | prompt tokens | cold TTFT | TTFT after restart | cached tokens | ratio |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, r in enumerate(runs, 1):
        rows.append(f"| {i} | {r.prompt_tokens} | {r.cold_ttft:.2f} s | {r.restart_ttft:.2f} s "
                    f"| {r.cached_tokens} | {r.ratio:.3f} |")
    cold = statistics.median(r.cold_ttft for r in runs)
    warm = statistics.median(r.restart_ttft for r in runs)
    rows.append(f"| median | | {cold:.2f} s | {warm:.2f} s | | {warm / cold:.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="the model to serve")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--system-tokens", type=int, default=2000,
                   help="about how long the system prompt is")
    p.add_argument("--port", type=int, default=8094, help="the servers' port")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.model, args.port, args.system_tokens, i))
        print(f"run {i + 1}: {asdict(runs[-1])}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([{**asdict(r), "ratio": r.ratio} for r in runs], indent=2))
    else:
        print(table(runs))
    cold = statistics.median(r.cold_ttft for r in runs)
    warm = statistics.median(r.restart_ttft for r in runs)
    if warm > 0.2 * cold:
        raise SystemExit(f"TTFT after the restart is {warm / cold:.2f} of the cold one "
                         "(more than 0.2)")


if __name__ == "__main__":
    main()
