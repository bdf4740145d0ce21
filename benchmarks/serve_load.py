"""Load on `mlx-mixtral serve`: requests/s, time to first token, and memory under a soak.

N streamed chat requests from C client threads; a share of the clients hang up after the first
chunk (their generations must stop). A monitor polls /health throughout: every poll must
answer, and the process's resident memory is recorded. Prints percentiles as a table (or JSON).

    python benchmarks/serve_load.py --url http://127.0.0.1:8080 [--requests 200]
        [--concurrency 8] [--disconnect 0.25] [--max-tokens 16] [--json]

`--sweep` starts its own servers instead, batched (the default --decode-concurrency) and one
request at a time (--decode-concurrency 1), and loads each with 1, 4 and 8 clients: requests/s,
TTFT p50/p90 and the model's forward passes per generated token (from /health), one table.

    python benchmarks/serve_load.py --sweep [--model demo] [--per-client 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx

TOPICS = ["the sea", "a mountain", "coffee", "rain", "a library", "trains", "the moon",
          "autumn", "bread", "a river", "chess", "a lighthouse"]


@dataclass
class Result:
    requests: int
    completed: int
    disconnected: int
    failed: int
    seconds: float
    requests_per_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    health_polls: int
    health_failures: int
    resident_start: int
    resident_peak: int
    errors: list[str] = field(default_factory=list)
    tokens: int = 0  # generated, as the replies' usage counts them


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_request(url: str, model: str, i: int, hang_up: bool, max_tokens: int,
                headers: dict[str, str]) -> tuple[str, float | None, int]:
    """("completed" | "disconnected" | "failed: ...", time to first token, tokens)."""
    topic = TOPICS[i % len(TOPICS)]
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "seed": i,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Write about {topic} (request {i})."}]}
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=300) as r:
            if r.status_code != 200:
                return f"failed: {r.status_code} {r.read()[:200]!r}", None, 0
            for line in r.iter_lines():
                if line.startswith("data:") and '"content"' in line and ttft is None:
                    ttft = time.perf_counter() - start
                    if hang_up:
                        return "disconnected", ttft, 0
                if line.startswith("data:") and '"completion_tokens"' in line:
                    tokens = json.loads(line[5:])["usage"]["completion_tokens"]
                if line.strip() == "data: [DONE]":
                    return "completed", ttft, tokens
    except httpx.HTTPError as e:
        return f"failed: {e}", None, 0
    return "failed: the stream ended without [DONE]", ttft, tokens


def run(url: str, requests: int = 200, concurrency: int = 8, disconnect: float = 0.25,
        max_tokens: int | tuple[int, int] = 16, api_key: str | None = None,
        seed: int = 0) -> Result:
    """`max_tokens`: each request's length, or (least, most): a random length in between."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    start_resident = httpx.get(url + "/health", timeout=30).json()["memory"]["resident"]
    polls, failures, peak = 0, 0, start_resident
    stop = threading.Event()

    def monitor() -> None:
        nonlocal polls, failures, peak
        while not stop.is_set():
            try:
                r = httpx.get(url + "/health", timeout=5)
                polls += 1
                if r.status_code != 200:
                    failures += 1
                else:
                    peak = max(peak, r.json()["memory"]["resident"])
            except httpx.HTTPError:
                polls += 1
                failures += 1
            stop.wait(0.25)

    rng = random.Random(seed)
    hang_ups = [rng.random() < disconnect for _ in range(requests)]
    least, most = (max_tokens, max_tokens) if isinstance(max_tokens, int) else max_tokens
    lengths = [rng.randint(least, most) for _ in range(requests)]
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda i: one_request(url, model, i, hang_ups[i], lengths[i],
                                                       headers), range(requests)))
    seconds = time.perf_counter() - began
    stop.set()
    watcher.join()
    ttfts = [t for o, t, _ in outcomes if o == "completed" and t is not None]
    errors = sorted({o for o, _, _ in outcomes if o.startswith("failed")})
    completed = sum(o == "completed" for o, _, _ in outcomes)
    return Result(requests, completed, sum(o == "disconnected" for o, _, _ in outcomes),
                  sum(o.startswith("failed") for o, _, _ in outcomes), seconds,
                  requests / seconds, percentile(ttfts, 0.5), percentile(ttfts, 0.9),
                  percentile(ttfts, 0.99), polls, failures, start_resident, peak, errors[:5],
                  sum(n for _, _, n in outcomes))


def table(r: Result) -> str:
    mb = 1e6
    return "\n".join([
        "| requests | completed | hung up | failed | requests/s | TTFT p50 | p90 | p99 "
        "| /health polls (failed) | resident start → peak |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {r.requests} | {r.completed} | {r.disconnected} | {r.failed} "
        f"| {r.requests_per_s:.2f} | {r.ttft_p50:.2f} s | {r.ttft_p90:.2f} s "
        f"| {r.ttft_p99:.2f} s | {r.health_polls} ({r.health_failures}) "
        f"| {r.resident_start / mb:.0f} → {r.resident_peak / mb:.0f} MB |"])


def start_server(model: str, port: int, *flags: str) -> subprocess.Popen:
    """`mlx-mixtral serve` on a loopback port, once it answers /health."""
    server = subprocess.Popen([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model",
                               model, "--port", str(port), "--log-level", "warning", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


def sweep(model: str, per_client: int, max_tokens: int, port: int) -> str:
    """The batched server against one request at a time, for 1, 4 and 8 clients."""
    rows = ["| server | clients | requests/s | TTFT p50 | TTFT p90 | forward passes per token |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    url = f"http://127.0.0.1:{port}"
    for label, flags in (("batched (default)", ()),
                         ("--decode-concurrency 1", ("--decode-concurrency", "1"))):
        server = start_server(model, port, *flags)
        try:
            for clients in (1, 4, 8):
                before = httpx.get(url + "/health").json()["queue"]["forward_passes"]
                r = run(url, clients * per_client, clients, disconnect=0.0,
                        max_tokens=max_tokens)
                passes = httpx.get(url + "/health").json()["queue"]["forward_passes"] - before
                rows.append(f"| {label} | {clients} | {r.requests_per_s:.2f} "
                            f"| {r.ttft_p50:.2f} s | {r.ttft_p90:.2f} s "
                            f"| {passes / max(r.tokens, 1):.2f} |")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(60)
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--disconnect", type=float, default=0.25,
                   help="share of clients that hang up after the first chunk")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--sweep", action="store_true",
                   help="start servers (batched, and --decode-concurrency 1) and load each "
                   "with 1, 4 and 8 clients")
    p.add_argument("--model", default="demo", help="with --sweep: the model to serve")
    p.add_argument("--per-client", type=int, default=3, help="with --sweep: requests each")
    p.add_argument("--port", type=int, default=8093, help="with --sweep: the servers' port")
    args = p.parse_args()
    if args.sweep:
        print(sweep(args.model, args.per_client, args.max_tokens, args.port))
        return
    result = run(args.url, args.requests, args.concurrency, args.disconnect, args.max_tokens,
                 args.api_key)
    print(json.dumps(asdict(result), indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
