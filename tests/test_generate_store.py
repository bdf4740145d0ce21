"""`generate` with the prefix store, and `mlx-mixtral cache`: a second run of a long prompt takes
its beginning from the blocks the first one kept on disk (a new store each run, as after a
restart), and its greedy reply is the reply of `--no-prompt-cache` (the plain path, the
oracle): for a tiny Mixtral, a windowed tiny Mistral far past its window, 8-bit KV and drafted
decoding. `cache` lists what is kept and `cache clear` deletes it."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from cli_helpers import cli, in_process, refusal
from conftest import build_hf, tiny_tokenizer

BLOCK = "16"  # tokens per block: a 100-word prompt has several
REPLY = ["--temp", "0", "--max-tokens", "12", "--cache-block", BLOCK]


def model_folder(path: Path, model_type: str, **overrides) -> Path:
    build_hf(path, model_type, max_position_embeddings=2048, **overrides)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    # (heads of 32: the smallest KV quantization group)
    return model_folder(tmp_path_factory.mktemp("mixtral"), "mixtral", hidden_size=128)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("windowed"), "mistral", sliding_window=16)


def words(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(3, 128)}" for _ in range(count))  # (t1, t2: BOS, EOS)


def reused(stderr: str) -> tuple[int, int]:
    """(taken, prompt tokens) from the line `generate` prints about the store."""
    found = re.search(r"Prefix store: (\d+) of (\d+) prompt tokens reused", stderr)
    assert found, stderr
    return int(found.group(1)), int(found.group(2))


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A data folder of the test's own (the store lives in it)."""
    monkeypatch.setenv("MLX_MIXTRAL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def three_runs(capsys, model: Path, prompt: str, *flags: str) -> tuple[int, int]:
    """A run from nothing (it fills the store), a second run (from the store) and the plain
    path: the same greedy reply; (tokens the second run took, prompt tokens)."""
    argv = ["generate", "--model", str(model), *REPLY, *flags, prompt]
    first, second, plain = (in_process(capsys, *argv), in_process(capsys, *argv),
                            in_process(capsys, *argv, "--no-prompt-cache"))
    for result in (first, second, plain):
        assert result.returncode == 0, result.stderr
    assert reused(first.stderr)[0] == 0 and "Prefix store" not in plain.stderr
    assert second.stdout == plain.stdout == first.stdout and second.stdout.strip()
    return reused(second.stderr)


def test_a_second_process_takes_the_prompt_from_the_store(mixtral, tmp_path):
    env = {"MLX_MIXTRAL_DATA_DIR": str(tmp_path / "data")}
    argv = ["generate", "--model", str(mixtral), *REPLY, words(100)]
    first, second = cli(*argv, env=env), cli(*argv, env=env)
    plain = cli(*argv, "--no-prompt-cache", env=env)
    assert first.returncode == second.returncode == plain.returncode == 0, first.stderr
    taken, total = reused(second.stderr)
    assert reused(first.stderr)[0] == 0 and total > 100
    assert taken == (total - 1) // 16 * 16  # every complete block but the last token's
    assert second.stdout == plain.stdout == first.stdout and second.stdout.strip()
    assert f"prompt: {total - taken} tokens" in second.stderr  # only the rest was prefilled


def test_windowed_mistral_far_past_its_window(windowed, data, capsys):
    # Its cache holds the last 16 positions: the blocks behind them are kept chunk by chunk
    # (prefill chunks of 512), and the second run goes on from a chunk's end.
    taken, total = three_runs(capsys, windowed, words(600))
    assert 512 <= taken < total


def test_8_bit_kv(mixtral, data, capsys):
    # A run from nothing attends its first prefill chunk (512 tokens) to float keys: the store
    # is used from there on.
    kv = ("--kv-bits", "8", "--kv-group-size", "32")
    taken, total = three_runs(capsys, mixtral, words(600, seed=1), *kv)
    assert 512 <= taken < total
    short, _ = three_runs(capsys, mixtral, words(100, seed=2), *kv)
    assert short == 0  # within the float part: prefilled as a run from nothing would


@pytest.mark.parametrize("window", [False, True], ids=["mixtral", "windowed"])
def test_drafted_decoding_from_the_store(mixtral, windowed, data, capsys, window):
    # Prompt lookup's cache keeps slack for rejected drafts: a restored one has it too.
    model, count = (windowed, 600) if window else (mixtral, 100)
    taken, _ = three_runs(capsys, model, words(count, seed=3), "--prompt-lookup", "3")
    assert taken > 0


def listing(capsys) -> dict:
    result = in_process(capsys, "cache", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cache_lists_and_clears(mixtral, windowed, data, capsys):
    for model, count in ((mixtral, 100), (windowed, 600)):
        assert in_process(capsys, "generate", "--model", str(model), *REPLY,
                          words(count)).returncode == 0
    shown = listing(capsys)
    assert shown["folder"] == str(data / "prefixes") and shown["disk_budget"] > 0
    names = {s["name"]: s for s in shown["spaces"]}
    assert set(names) == {str(mixtral), str(windowed)}
    assert names[str(mixtral)]["blocks"] > 0 and names[str(mixtral)]["bytes"] > 0
    assert shown["disk_bytes"] == sum(s["bytes"] for s in shown["spaces"])
    table = in_process(capsys, "cache").stdout
    assert str(data / "prefixes") in table and str(mixtral) in table

    one = in_process(capsys, "cache", "clear", "--model", str(mixtral))
    assert one.returncode == 0 and one.stdout.startswith("Freed ")
    left = listing(capsys)["spaces"]
    assert [s["name"] for s in left] == [str(windowed)] and left[0]["bytes"] > 0

    everything = in_process(capsys, "cache", "clear")
    assert everything.returncode == 0 and "1 model" in everything.stdout
    assert listing(capsys)["disk_bytes"] == 0
    assert not list((data / "prefixes").rglob("*.block"))


@pytest.mark.parametrize("argv, words_", [
    (["generate", "--prompt-cache", "x.cache", "--no-prompt-cache", "hi"],
     "--prompt-cache FILE and --no-prompt-cache exclude each other"),
    (["generate", "--cache-block", "0", "hi"], "--cache-block must be between 1"),
    (["generate", "--cache-disk", "lots", "hi"], "--cache-disk"),
    (["cache", "clear", "--model", "nothing-like-it"], "the prefix store has no blocks of it"),
    (["cache", "empty"], "invalid choice"),
])
def test_bad_uses_are_one_line(argv, words_, data, capsys):
    assert words_ in refusal(argv, capsys)


@pytest.mark.parametrize("flag", ["--raw", "--prompt-cache"])
def test_raw_prompts_and_prompt_cache_files_leave_the_store_out(flag, mixtral, data, tmp_path,
                                                                  capsys):
    flags = [flag, str(tmp_path / "prompt.cache")] if flag == "--prompt-cache" else [flag]
    result = in_process(capsys, "generate", "--model", str(mixtral), *REPLY, *flags,
                        words(100))
    assert result.returncode == 0, result.stderr
    assert "Prefix store" not in result.stderr
    assert not list(data.rglob("*.block"))
    if flag == "--prompt-cache":
        assert (tmp_path / "prompt.cache").is_file()  # the file of one's own, as before
