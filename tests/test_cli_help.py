"""The command line's words about itself and models: --help, info, list, and bench's checks."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import cli, refusal, subparser, tiny_folder

import mlx_mixtral
from mlx_mixtral.loading import resolve


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"))


def assert_defaults_shown(command: str, text: str) -> None:
    """Every flag of `command` with a default shows it in its own help entry."""
    import argparse
    import re

    from mlx_mixtral.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    entries = re.split(r"\n  (?=-)", text)  # one entry per option
    for action in sub.choices[command]._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            continue
        flag = action.option_strings[0]
        (entry,) = [e for e in entries if re.match(rf"(-\w, )?{flag}\b", e)]
        assert f"(default: {action.default})" in " ".join(entry.split()), (command, flag)


def test_help_lists_every_flag_with_defaults():
    top = cli("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "convert" in top.stdout
    gen = cli("generate", "--help").stdout
    for flag in ("--model", "--prompt", "--system", "--max-tokens", "--temp", "--top-p",
                 "--top-k", "--min-p", "--repetition-penalty", "--seed", "--raw"):
        assert flag in gen
    for command in ("chat", "generate", "convert", "info", "cache", "bench"):
        assert_defaults_shown(command, cli(command, "--help").stdout)
    for command in ("chat", "generate", "bench"):
        assert "--dtype {float32,float16,bfloat16}" in cli(command, "--help").stdout
    version = cli("--version")
    assert version.returncode == 0 and mlx_mixtral.__version__ in version.stdout


def test_info_preset_mixtral_8x7b():
    result = cli("info", "--preset", "mixtral-8x7b")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "46.7B total, 12.9B active per token" in out
    assert "experts        8, top-2" in out
    for row in ("float16       93.4 GB", "8-bit         49.6 GB", "6-bit", "4-bit         26.3 GB",
                "3-bit"):
        assert row in out
    assert "runs" in out and "KV cache" in out


def test_info_of_a_model_folder(folder):
    result = cli("info", "--model", str(folder))
    assert result.returncode == 0, result.stderr
    assert "dense decoder (mistral architecture)" in result.stdout
    assert "window         8" in result.stdout
    assert "stored as      float32" in result.stdout and "once loaded" in result.stdout
    assert "chat format" in result.stdout


def test_info_of_the_demo_names_what_it_is():
    out = cli("info", "--model", "demo").stdout
    assert "dense decoder (llama architecture)" in out and "Mistral" not in out
    assert "stored as      GGUF Q4_1 (mostly), 98.4 MB on disk" in out  # as `list` says
    assert "chat format    the model's own chat template (Jinja)" in out
    assert " 0.0 " not in out  # sizes in the unit that fits (issue 27 finding 19)


def test_info_and_list_describe_a_model_alike():
    from mlx_mixtral.catalog.local import demo_models
    from mlx_mixtral.catalog.summary import summarize
    from mlx_mixtral.cli.info import info
    from mlx_mixtral.loading import describe
    from mlx_mixtral.units import size

    (listed,) = demo_models()
    summary = summarize(describe(resolve("demo")))
    assert (listed.disk_bytes, listed.memory_bytes) == (summary.disk_bytes, summary.memory_bytes)
    assert f"{size(summary.disk_bytes)} on disk, {size(summary.memory_bytes)} once loaded" in \
        info("demo")


def test_info_memory_error_names_its_own_flag():
    """`info` calls the budget --memory: its error names that flag, not generate's
    --max-memory (issue 27, finding 7)."""
    result = cli("info", "--model", "demo", "--memory", "abc")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-mixtral: error: "), lines
    assert "--memory" in lines[0] and "--max-memory" not in lines[0] \
        and "max_memory" not in lines[0], lines[0]


def test_list_command(tmp_path):
    result = cli("list", env={**os.environ, "OLLAMA_MODELS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["NAME", "FROM", "ON", "DISK", "IN",
                                                     "MEMORY", "FITS"]
    assert "demo" in result.stdout


def test_info_counts_memory_per_rank():
    out = cli("info", "--preset", "mixtral-8x22b", "--ranks", "2", "--memory", "40GB").stdout
    assert "split over 2 ranks (tensor parallel)" in out
    assert "    4-bit         79.2 GB          39.7 GB  yes   paging: " in out, out


def _help_entries(command: str) -> dict[str, str]:
    """Each option's help entry in `command --help`, on one line, by its long flag."""
    import re

    text = subparser(command).format_help()
    options = text[text.index("options:"):]
    entries = re.split(r"\n  (?=-)", options)[1:]
    return {re.search(r"--[\w-]+", e).group(0): " ".join(e.split()) for e in entries}


@pytest.mark.parametrize("command", ["chat", "generate", "convert", "info", "list", "cache",
                                     "bench", "serve"])
def test_help_says_each_default_once(command):
    """Finding 18: no second "(default: None)" after a default said in words, none for a
    required flag, no "(default: [])", no "%%"."""
    text = subparser(command).format_help()
    assert "%%" not in text and "(default: None)" not in text and "(default: [])" not in text
    for entry in _help_entries(command).values():
        assert entry.count("(default") <= 1, entry
    parser = subparser(command)
    for action in parser._actions:
        if action.required:
            assert "(default" not in _help_entries(command)[action.option_strings[-1]]


def test_help_entries_read_as_written():
    """Finding 18, snapshot-like: entries the issue named, as the reader sees them."""
    assert _help_entries("generate")["--dtype"] == (
        "--dtype {float32,float16,bfloat16} compute in this dtype (default: float32 on the CPU "
        "backend, the checkpoint's own on Metal)")
    assert _help_entries("convert")["--hf-path"] == (
        "--hf-path HF_PATH source: a folder (config.json + safetensors) or Hugging Face repo "
        "id, a .gguf file, or ollama:NAME. A GGUF's Q4_0, Q4_1 and Q8_0 tensors are written as "
        "they are (exact); other quantized types are dequantized")
    assert _help_entries("generate")["--top-p"].endswith("(default: 0.95)")
    assert _help_entries("serve")["--cors-origin"].count("(default") == 0
    for flag in ("--max-memory", "--kv-bits"):
        assert _help_entries("bench")[flag].count("(default") == 1
    assert _help_entries("chat")["--db"].count("(default") == 1
    assert "(sizes, shares of the model's size, or min: min,50%,75%)" in " ".join(
        subparser("bench").format_help().split())


def test_too_small_a_budget_for_a_dense_model_says_why(capsys):
    """Finding 20: `--max-memory 1KB` said "0.0 MB", spoke of experts and suggested converting
    the demo's GGUF."""
    line = refusal(["generate", "--model", "demo", "--max-memory", "1KB", "hi"], capsys)
    assert "--max-memory 1.0 KB is too small for SmolLM2-135M-Instruct.Q4_1.gguf" in line
    assert "0.0" not in line and "expert" not in line and "convert" not in line, line
    assert "GGUF file quantized with fewer bits" in line


def test_sizes_read_in_the_unit_that_fits():
    from mlx_mixtral.units import parse_size, size

    for text in ("1KB", "23040", "98.4MB", "25.3GB"):
        assert size(parse_size(text)) == {"1KB": "1.0 KB", "23040": "23.0 KB",
                                          "98.4MB": "98.4 MB", "25.3GB": "25.3 GB"}[text]
    assert size(512) == "512 bytes"


def test_one_model_file_is_listed_once(tmp_path, monkeypatch, folder):
    """Finding 9: the demo was listed as `demo` and as its file's path (the app had noted the
    path), and a chat held with one was "held with" the other. One identity per file."""
    from mlx_mixtral.catalog import local
    from mlx_mixtral.catalog.local import SEEN_FILE, local_models, remember

    demo = resolve("demo")
    data = tmp_path / "data"
    data.mkdir()
    (data / SEEN_FILE).write_text(json.dumps({"paths": [str(demo)]}))  # as noted before
    monkeypatch.setenv("MLX_MIXTRAL_DATA_DIR", str(data))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    # (not huggingface_hub: imported here, it would fix its cache folder for later tests)
    monkeypatch.setattr(local, "hub_cache_models", lambda cache=None: [])
    remember(demo)
    remember(folder)
    remember(folder / ".." / folder.name)  # the same folder, spelled another way
    names = [m.name for m in local_models()]
    assert names == [str(folder), "demo"], names
    assert os.path.samefile(demo, resolve(names[-1]))
    from mlx_mixtral.loading.locate import same_model  # what the app asks of a saved chat

    assert same_model("demo", str(demo)) and same_model(str(folder / ".." / folder.name),
                                                        str(folder))
    assert not same_model("demo", str(folder))


@pytest.mark.parametrize("argv", [
    ["--max-memory", "abc"], ["--max-memory", "min,150%"], ["--max-memory", "-1GB"],
    ["--max-memory", "min", "--compare", "mlx-lm"], ["--kv-bits", "5"],
])
def test_bench_refuses_a_flag_before_it_builds_anything(argv, capsys, monkeypatch):
    """Finding 8: `bench --max-memory abc` built the preset (65 s) before refusing the value."""
    from mlx_mixtral.cli import bench

    def build(name: str):
        raise AssertionError(f"the preset {name} was built before the flags were checked")

    monkeypatch.setattr(bench, "preset_folder", build)
    assert refusal(["bench", *argv], capsys).startswith("mlx-mixtral: error: ")


def test_bench_runs_the_demo_gguf(capsys, monkeypatch):
    """Finding 8: `bench --model demo` said "convert it first", which cannot read a GGUF.
    It benches the GGUF as generate loads it; only what needs a folder is refused."""
    from mlx_mixtral.cli import bench

    real = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: real(*a, **{**k, "extras": False}))
    from mlx_mixtral.cli.main import main

    assert main(["bench", "--model", "demo", "--prompt-tokens", "8", "--gen-tokens", "2",
                 "--runs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert os.path.samefile(result["model"], resolve("demo"))
    assert result["engines"]["mlx-mixtral"]["decode_tps"] > 0
    line = refusal(["bench", "--model", "demo", "--compare", "mlx-lm"], capsys)
    assert "--compare" in line and "convert" not in line, line


def test_info_has_one_memory_table_and_one_memory_figure(monkeypatch):
    """Finding 19: `info` had two tables with different sizes for one precision, "KV cache
    (float16): 0.0 MB per token", and a memory figure of its own (`list` another)."""
    from mlx_mixtral.cli.info import info
    from mlx_mixtral.cli.listing import list_main
    from mlx_mixtral.loading import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 7_000_000_000)
    out = info("demo")
    assert "memory: 7.0 GB (available now on this machine)" in out
    assert "7.0 GB of memory is available now" in list_main()
    for label in ("float16", "8-bit", "4-bit", "3-bit"):
        assert len([line for line in out.splitlines() if line.startswith(f"    {label} ")]) == 1
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, keys and values in float16.
    assert f"KV cache       {30 * 3 * 64 * 2 * 2 / 1000:.1f} KB per token (float16)" in out


def test_the_help_formatter_keeps_a_default_said_in_words():
    """Finding 18 at its root: any flag whose help says its default gets no second one."""
    from mlx_mixtral.cli.commands import Parser

    p = Parser(prog="x", description="50%% of it")
    p.add_argument("--size", default="2GB", help="a budget (default: two gigabytes)")
    p.add_argument("--n", type=int, default=3, help="a count")
    p.add_argument("--path", required=True, help="where")
    text = " ".join(p.format_help().split())
    assert "a budget (default: two gigabytes) --n N" in text and "a count (default: 3)" in text
    assert "where" in text and text.count("(default") == 2 and "50% of it" in text
