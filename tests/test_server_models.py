"""Several models behind one `serve`: each request gets the model it names, loaded on demand
within --max-models, unloaded by keep_alive; a load never holds up the other models' requests.
The oracle for each model's replies is the library run on that model alone, in this process."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import build_hf
from server_helpers import V3_TOKENIZER, Server, free_port

from mlx_mixtral import load
from mlx_mixtral.generation import generate
from mlx_mixtral.generation.sampling import SamplingParams

PROMPT = [1, 1091, 2201, 1044, 9300, 1278, 3311]  # token ids (any will do: random weights)
TOKENS = 8


def tiny(folder: Path, seed: int) -> Path:
    build_hf(folder, "mixtral", seed=seed, vocab_size=32768, num_local_experts=4,
             num_experts_per_tok=2, max_position_embeddings=1024)
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: tiny(root / name, seed) for seed, name in enumerate(("alpha", "beta",
                                                                      "gamma"), start=1)}


@pytest.fixture(scope="module")
def expected(folders) -> dict[str, str]:
    """Each model's greedy reply to PROMPT, from the library with that model alone."""
    out = {}
    for name, folder in folders.items():
        model, tokenizer = load(folder)
        out[name] = generate(model, tokenizer, PROMPT, sampling=SamplingParams(
            temperature=0, max_tokens=TOKENS))
    return out


def complete(server: Server, name: str, **extra) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": name, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, **extra})


def loaded(server: Server) -> set[str]:
    return {m["name"] for m in httpx.get(server.url + "/api/ps", timeout=10).json()["models"]}


def wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def two(folders):
    server = Server("--max-models", "2", "--model", str(folders["alpha"]), "--model",
                    str(folders["beta"]), "--model", str(folders["gamma"]))
    yield server
    server.stop()


def test_each_request_gets_the_model_it_names(two, expected):
    replies = [(name, complete(two, name)) for name in ("alpha", "beta", "alpha", "beta")]
    for name, r in replies:
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        assert r.json()["choices"][0]["text"] == expected[name], name
    assert expected["alpha"] != expected["beta"]  # (else the test could not tell them apart)
    listed = {m["id"] for m in httpx.get(two.url + "/v1/models", timeout=10).json()["data"]}
    assert listed == {"alpha", "beta", "gamma"}
    assert httpx.get(two.url + "/v1/models/gamma", timeout=10).status_code == 200
    missing = complete(two, "delta")
    assert missing.status_code == 404 and "alpha" in missing.text


def test_keep_alive_zero_unloads_and_a_third_model_evicts_the_least_recent(two, expected):
    assert complete(two, "beta").status_code == 200
    assert loaded(two) == {"alpha", "beta"}
    assert complete(two, "alpha").status_code == 200  # alpha is now the most recent
    r = complete(two, "gamma")  # over --max-models 2: beta, the least recently used, goes
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["gamma"]
    assert loaded(two) == {"alpha", "gamma"}
    # Ollama's way to unload at once: nothing to say, keep_alive 0.
    r = httpx.post(two.url + "/api/generate", json={"model": "gamma", "keep_alive": 0},
                   timeout=30)
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert loaded(two) == {"alpha"}
    # keep_alive 0 on a request: unloaded once it is answered and idle.
    r = httpx.post(two.url + "/api/generate", timeout=120, json={
        "model": "beta", "prompt": "hi", "stream": False, "keep_alive": 0,
        "options": {"num_predict": 2}})
    assert r.status_code == 200, r.text
    assert wait_for(lambda: "beta" not in loaded(two))
    ps = httpx.get(two.url + "/api/ps", timeout=10).json()["models"]
    assert [m["name"] for m in ps] == ["alpha"] and ps[0]["size"] > 0 and ps[0]["expires_at"]


def test_a_loading_model_holds_up_only_its_own_requests(folders, expected):
    """gamma's load takes 4 s longer (tests/slow_load.py sleeps on the loading thread):
    meanwhile alpha answers, and gamma's request waits for its model."""
    launcher = (str(Path(__file__).with_name("slow_load.py")), "gamma", "4")
    server = Server("--max-models", "2", "--model", str(folders["alpha"]), "--model",
                    str(folders["gamma"]), launcher=launcher)
    try:
        done: dict[str, float] = {}

        def ask(name: str) -> None:
            r = complete(server, name)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[name]
            done[name] = time.monotonic()

        slow = threading.Thread(target=ask, args=("gamma",))
        slow.start()
        assert wait_for(lambda: any(m["name"] == "gamma" and m["loading"]
                                    for m in server.health()["models"]), 10)
        ask("alpha")
        still_loading = "gamma" not in done and "gamma" not in loaded(server)
        slow.join()
        assert still_loading, "alpha waited for gamma's load"
        assert done["alpha"] < done["gamma"]
        assert loaded(server) == {"alpha", "gamma"}
    finally:
        server.stop()


@pytest.mark.parametrize("flags, says", [
    (("--pin", "nosuch"), "--pin nosuch: not one of the served models (alpha)"),
    (("--max-models", "0"), "--max-models must be at least 1"),
    (("--keep-alive", "bogus"), "--keep-alive: 'bogus' is not a duration"),
])
def test_model_flags_are_checked_with_one_model_too(folders, flags, says):
    """--pin, --max-models and --keep-alive are refused in one line before anything loads,
    with one --model as with several (they were accepted unchecked with one)."""
    import subprocess
    import sys

    # (a timeout, not a hang, if the server started: it would serve until stopped)
    done = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model",
                           str(folders["alpha"]), "--port", str(free_port()), *flags],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("mlx-mixtral: error: ") and says in line, line


def test_a_pinned_model_outlives_every_keep_alive(folders):
    """--pin: the server's --keep-alive and a request's keep_alive unload the other model once
    it is idle, never the pinned one (which /api/ps shows as kept forever)."""
    server = Server("--max-models", "2", "--keep-alive", "1s", "--pin", "alpha", "--model",
                    str(folders["alpha"]), "--model", str(folders["beta"]))
    try:
        r = httpx.post(server.url + "/api/generate", timeout=120, json={
            "model": "alpha", "prompt": "hi", "stream": False, "keep_alive": "1s",
            "options": {"num_predict": 2}})
        assert r.status_code == 200, r.text
        assert complete(server, "beta").status_code == 200
        assert wait_for(lambda: loaded(server) == {"alpha"})  # beta's 1 s ran out
        time.sleep(1.5)  # (alpha has been idle longer than both keep-alives)
        (ps,) = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
        assert ps["name"] == "alpha" and ps["expires_at"] == "2318-11-26T00:00:00Z"
    finally:
        server.stop()
