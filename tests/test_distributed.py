"""One model over two ranks with `mlx.launch -n 2 --backend ring` on this machine: the same
tokens as one process (tensor and pipeline modes, resident or streaming within --max-memory),
logits within 1e-4 in float32, about half the memory and half the reads per rank, loading
included, and a lost rank or an impossible world size ending in one line.

mlx.launch can exit 0 when a rank failed, so every rank's exit code and stderr are kept by
`rank_wrap.sh`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_tokenizer

from mlx_mixtral import ModelArgs
from mlx_mixtral.convert import convert
from mlx_mixtral.convert.synthetic import write_hf_checkpoint

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
EXE = shutil.which("mlx-mixtral")
LAUNCH = shutil.which("mlx.launch")
MODES = [[], ["--pipeline"]]


def tiny(folder: Path, **shape) -> Path:
    """A random model with the word-level test tokenizer (tokens t1 .. t127)."""
    base = dict(vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    hf = folder.with_name(folder.name + "-hf")
    write_hf_checkpoint(hf, ModelArgs.from_dict({**base, **shape}), dtype=mx.float32, seed=5)
    tiny_tokenizer().save_pretrained(hf)
    return hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    mixtral = tiny(root / "mixtral", model_type="mixtral", num_local_experts=8,
                   num_experts_per_tok=2)
    convert(mixtral, root / "mixtral-4bit", quantize=True, dtype="float32", progress=False)
    convert(mixtral, root / "mixtral-f32", progress=False)
    mistral = tiny(root / "mistral", model_type="mistral", sliding_window=16)
    return {"mixtral-4bit": root / "mixtral-4bit", "mixtral-f32": root / "mixtral-f32",
            "mistral-window": mistral}


def start_ranks(tmp: Path, n: int, *command: str) -> subprocess.Popen:
    """`mlx.launch` running `command` on n ranks (`rank_wrap.sh` keeps each rank's output and
    exit code in `tmp`), with its relay kept quiet.

    The relay's loop forwards mlx.launch's stdin to every rank and never sleeps while a rank's
    stdin can take more: it keeps more than a core busy (8 s of CPU for two ranks that sleep
    6 s), slowing the ranks and every other test. Each rank closes its stdin (`rank_wrap.sh`),
    and a byte sent now and then makes the relay's write fail, after which it waits for output
    instead; its own stdin, open and empty, is a wait too (at end of file it would spin)."""
    tmp.mkdir(parents=True, exist_ok=True)
    launcher = subprocess.Popen([LAUNCH, "-n", str(n), "--backend", "ring",
                                 str(HERE / "rank_wrap.sh"), str(tmp), *command],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def nudge() -> None:
        while launcher.poll() is None:
            time.sleep(0.5)
            try:
                launcher.stdin.write(b"\n")
                launcher.stdin.flush()
            except (BrokenPipeError, ValueError):
                return

    threading.Thread(target=nudge, daemon=True).start()
    return launcher


def launch(tmp: Path, n: int, *command: str, timeout: float = 240) -> list[dict]:
    """Run `command` on n ranks; each rank's exit code, stdout and stderr."""
    launcher = start_ranks(tmp, n, *command)
    try:
        launcher.wait(timeout=timeout)
    finally:
        launcher.kill()
        with contextlib.suppress(BrokenPipeError, ValueError):  # (a nudge may be in flight)
            launcher.stdin.close()
    return [ranks(tmp, r) for r in range(n)]


def ranks(tmp: Path, r: int) -> dict:
    def read(name: str) -> str:
        path = tmp / f"{name}.{r}"
        return path.read_text() if path.exists() else ""

    return {"rc": int(read("rc") or -1), "out": read("out"), "err": read("err")}


PROMPT = "t5 t9 t13 t2"
GENERATE = ["generate", "--temp", "0", "--max-tokens", "40", "--raw", PROMPT]


@pytest.mark.parametrize("name", ["mixtral-4bit", "mixtral-f32", "mistral-window"])
def test_two_ranks_generate_the_same_tokens(models, name, tmp_path):
    from mlx_mixtral import load
    from mlx_mixtral.generation.stream import generate

    # One process's reply, computed here (a command of its own would print the same line).
    alone = generate(*load(models[name]), PROMPT, raw=True, **greedy(40)) + "\n"
    assert len(alone.split()) >= 30  # longer than the window (16) for the Mistral
    for mode in MODES:
        results = launch(tmp_path / (mode[0][2:] if mode else "tensor"), 2, EXE, *GENERATE,
                         "--model", str(models[name]), *mode)
        assert [r["rc"] for r in results] == [0, 0], results
        assert results[0]["out"] == alone, mode  # rank 0 prints ...
        assert results[1]["out"] == ""  # ... and only rank 0
        assert "over 2 ranks" in results[0]["err"]


def probe(tmp: Path, mode: str, folder: Path, *extra: object) -> dict:
    """dist_probe.py's findings alone or on two ranks (`extra`: its token count and budget)."""
    command = [sys.executable, str(HERE / "dist_probe.py"), mode, str(folder), str(tmp / mode),
               *map(str, extra)]
    if mode == "single":
        subprocess.run(command, check=True, timeout=240)
    else:
        results = launch(tmp / f"{mode}-ranks", 2, *command)
        assert [r["rc"] for r in results] == [0, 0], results
    found = {"logits": np.load(tmp / f"{mode}.npy")}
    for r in range(1 if mode == "single" else 2):
        found[r] = json.loads((tmp / f"{mode}.{r}.json").read_text())
    return found


def test_float32_logits_agree_and_each_rank_costs_half_loading_included(models, tmp_path):
    """Each rank of two, tensor parallel or pipeline, over the whole process with loading
    (nothing reset): MLX's peak and the peak resident memory (above the interpreter's) at most
    0.55x of one process's, and at most 0.55x of the checkpoint's bytes read while loading
    (as the system counts reads)."""
    folder = models["mixtral-f32"]
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    single = probe(tmp_path, "single", folder)
    for mode in ("tensor", "pipeline"):
        split = probe(tmp_path, mode, folder)
        assert np.abs(split["logits"] - single["logits"]).max() < 1e-4, mode
        assert split[0]["tokens"] == split[1]["tokens"] == single[0]["tokens"]
        for r in (0, 1):  # the weights dominate this model's memory
            rank, one = split[r], single[0]
            assert rank["peak"] >= rank["loaded"], "the peak must cover loading"
            assert rank["peak"] <= 0.55 * one["peak"], (mode, r, rank["peak"] / one["peak"])
            assert rank["rss"] <= 0.55 * one["rss"], (mode, r, rank["rss"] / one["rss"])
            assert rank["read"] <= 0.55 * stored, (mode, r, rank["read"] / stored)


def test_two_ranks_streaming_give_one_process_s_tokens_within_budget(models, tmp_path):
    """--max-memory on two ranks: each pages its own share of the experts (a tensor-parallel
    rank its slices of every layer's, a pipeline rank its own layers' alone) within a budget
    a third of what it would hold resident; 256 greedy tokens are the resident single
    process's, and each rank's MLX peak (loading included) is within its budget + 5%, its
    peak RSS above the interpreter's baseline within the budget + 10%."""
    folder = models["mixtral-f32"]
    single = probe(tmp_path, "single", folder, 256)[0]
    budget = 55_000_000  # a rank holds about 104 MB resident
    for mode, layers in (("tensor", 8), ("pipeline", 4)):
        split = probe(tmp_path, mode, folder, 256, budget)
        for r in (0, 1):
            rank = split[r]
            assert rank["tokens"] == single["tokens"], (mode, r)
            assert rank["layers"] == rank["paged_layers"] == layers, (mode, r)
            assert 2 <= rank["slots"] < 8 and rank["expert_reads"] > 0, (mode, r)
            assert rank["read_threads"] == 3, (mode, r)  # read_threads reaches each rank
            assert rank["peak"] <= 1.05 * budget, (mode, r, rank["peak"] / budget)
            # and as the system counts it: RSS above the interpreter's own, within budget + 10%
            assert rank["rss"] <= 1.10 * budget, (mode, r, rank["rss"] / budget)


@pytest.mark.alone  # a deadline
def test_a_killed_rank_ends_the_other_in_one_line(models, tmp_path):
    launcher = start_ranks(tmp_path, 2, EXE, "generate", "--model", str(models["mixtral-4bit"]),
                           "--temp", "0", "--max-tokens", "3000", "--raw", "--dist-timeout",
                           "20", "t5")
    try:
        deadline = time.monotonic() + 120
        out = tmp_path / "out.0"
        while not (out.exists() and len(out.read_text().split()) >= 5):
            assert time.monotonic() < deadline, "rank 0 never started generating"
            time.sleep(0.2)
        os.kill(int((tmp_path / "pid.1").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        while not (tmp_path / "rc.0").exists():
            assert time.monotonic() - killed < 30, "rank 0 did not stop within the timeout"
            time.sleep(0.2)
    finally:
        launcher.kill()
    rank0 = ranks(tmp_path, 0)
    assert rank0["rc"] == 1
    errors = [line for line in rank0["err"].splitlines() if not line.startswith("Loading ")]
    assert len(errors) == 1 and errors[0].startswith("mlx-mixtral: error: rank 0: lost"), errors


def test_three_ranks_for_four_kv_heads_is_refused_on_every_rank(models, tmp_path):
    results = launch(tmp_path, 3, EXE, *GENERATE, "--model", str(models["mixtral-4bit"]))
    for r in results:
        assert r["rc"] == 2, results
        assert r["err"].strip().splitlines() == [
            "mlx-mixtral: error: 3 ranks cannot split 8 attention heads, 4 KV heads, 1024 MLP "
            "width evenly in tensor mode; use 2 or 4 ranks, or --pipeline"], r["err"]


def test_chat_under_mlx_launch_points_elsewhere(tmp_path):
    results = launch(tmp_path, 2, EXE, "chat")
    for r in results:
        assert r["rc"] == 2 and "does not run under mlx.launch" in r["err"], results


def test_bench_under_mlx_launch_reports_each_rank(models, tmp_path):
    """Within the least budget each rank's share runs in (--max-memory min)."""
    results = launch(tmp_path, 2, EXE, "bench", "--model", str(models["mixtral-4bit"]),
                     "--runs", "1", "--gen-tokens", "16", "--prompt-tokens", "64",
                     "--max-memory", "min")
    assert [r["rc"] for r in results] == [0, 0], results
    report = results[0]["out"]
    assert "over 2 ranks (tensor parallel)" in report and "decode tok/s" in report
    assert "peak memory, rank 0" in report and "peak memory, rank 1" in report
    assert results[1]["out"] == ""
    assert "budget per rank" in report and "experts per layer in memory" in report
    # Tensor-parallel ranks hold the same: the same peak (a gather that raced the step
    # computed ahead gave rank 1's as a few KB).
    peaks = re.findall(r"peak memory, rank \d:\s+([\d.]+) (\w+)", report)
    assert len(set(peaks)) == 1, peaks


def test_a_group_that_never_forms_ends_in_one_line(tmp_path):
    """Rank 1 never joins: rank 0 gives up after --dist-timeout with one line. (Not `alone`:
    the deadline is loose, and the test mostly waits for rank 1's sleep.)"""
    script = ('if [ "$MLX_RANK" = 1 ]; then sleep 15; else exec "$@"; fi')
    start = time.monotonic()
    results = launch(tmp_path, 2, "sh", "-c", script, "sh", EXE, *GENERATE, "--model", "demo",
                     "--dist-timeout", "5", timeout=60)
    assert results[0]["rc"] != 0  # killed by its watchdog: MLX was blocked, holding the GIL
    assert results[0]["err"].strip().splitlines() == [
        "mlx-mixtral: error: rank 0: nothing from the other ranks for 5 s while forming the "
        "group (a rank stopped, or the network failed); stopping (--dist-timeout sets the wait)"]
    assert time.monotonic() - start < 50


def test_mlx_rank_set_by_hand_is_one_line_and_exit_2():
    """MLX_RANK without mlx.launch's hostfile (a user exporting it by hand): one line naming
    both ways out, exit 2, no traceback."""
    env = {**os.environ, "MLX_RANK": "0"}
    env.pop("MLX_HOSTFILE", None)
    r = subprocess.run([EXE, "generate", "--max-tokens", "2", "hi"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mlx-mixtral: error: MLX_RANK is set but no distributed backend")
    assert "mlx.launch" in lines[0] and "unset MLX_RANK" in lines[0]


def greedy(max_tokens: int) -> dict:
    from mlx_mixtral.generation.sampling import SamplingParams

    return {"sampling": SamplingParams(temperature=0, max_tokens=max_tokens)}


def serve_two_ranks(folder: Path, tmp_path: Path, port: int):
    """`serve` under mlx.launch on two ranks (greedy), and an official client once it answers."""
    import openai

    launcher = start_ranks(tmp_path, 2, EXE, "serve", "--model", str(folder), "--port",
                           str(port), "--temp", "0", "--dist-timeout", "30")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0, timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.models.list()
            return launcher, client
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                launcher.kill()
                raise AssertionError(ranks(tmp_path, 0)["err"]) from None
            time.sleep(0.5)


def stop_rank_0(tmp_path: Path) -> None:
    os.kill(int((tmp_path / "pid.0").read_text()), signal.SIGINT)
    wait_file(tmp_path / "rc.0", 60)
    wait_file(tmp_path / "rc.1", 60)


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """One `serve` on two ranks for the tests below (what they check is per request), its
    client, and the same model loaded here as the oracle; stopping rank 0 afterwards must stop
    both ranks cleanly."""
    from server_helpers import free_port

    from mlx_mixtral import load

    logs = tmp_path_factory.mktemp("serve-ranks")
    launcher, client = serve_two_ranks(models["mixtral-4bit"], logs, free_port())
    try:
        yield client, load(models["mixtral-4bit"])
        stop_rank_0(logs)
    finally:
        launcher.kill()
    results = [ranks(logs, r) for r in (0, 1)]
    assert [r["rc"] for r in results] == [0, 0], results
    assert "Traceback" not in results[0]["err"] + results[1]["err"]


def test_serve_under_two_ranks_answers_the_openai_client_like_one_process(served):
    """Rank 0 serves HTTP, rank 1 follows its jobs: the official client's answers equal one
    process's, through a client that hangs up mid-stream and a second turn from the cache;
    stopping rank 0 stops both ranks cleanly (the fixture's end)."""
    from mlx_mixtral.generation.stream import generate

    client, (model, tokenizer) = served
    prompt = PROMPT
    turn1 = [{"role": "user", "content": "t5 t9"}]
    want = {"raw": generate(model, tokenizer, prompt, raw=True, **greedy(40)),
            "chat": generate(model, tokenizer, turn1, **greedy(12))}
    stream = client.completions.create(model="mixtral-4bit", prompt=prompt, max_tokens=200,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # rank 0 stops; rank 1 must stop after the same token
    whole = client.completions.create(model="mixtral-4bit", prompt=prompt, max_tokens=40)
    assert whole.choices[0].text == want["raw"]
    first = client.chat.completions.create(model="mixtral-4bit", messages=turn1, max_tokens=12)
    assert first.choices[0].message.content == want["chat"]
    turn2 = [*turn1, {"role": "assistant", "content": want["chat"]},
             {"role": "user", "content": "t7"}]
    second = client.chat.completions.create(model="mixtral-4bit", messages=turn2, max_tokens=12)
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # both ranks' pools agree
    assert second.choices[0].message.content == generate(model, tokenizer, turn2, **greedy(12))


def test_serve_under_two_ranks_batches_four_clients_like_one_process(served):
    """4 concurrent clients (one hangs up mid-stream, one asks for 2 choices): the ranks agree
    on who joins and leaves at every pass, and each client gets one process's tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from mlx_mixtral.generation.stream import generate

    client, (model, tokenizer) = served
    prompts = ["t5 t9 t13 t2", "t1 t2", "t7 " * 30 + "t8", "t3 t4 t5 t6 t7 t8"]
    want = [generate(model, tokenizer, p, raw=True, **greedy(24)) for p in prompts]

    def ask(i: int) -> list[str]:
        if i == 0:  # this one hangs up after a few tokens
            stream = client.completions.create(model="mixtral-4bit", prompt=prompts[0],
                                               max_tokens=200, stream=True)
            for k, _ in enumerate(stream):
                if k == 3:
                    break
            stream.close()
        reply = client.completions.create(model="mixtral-4bit", prompt=prompts[i],
                                          max_tokens=24, n=2 if i == 1 else 1)
        return [c.text for c in reply.choices]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    assert got == [[w] * (2 if i == 1 else 1) for i, w in enumerate(want)]
