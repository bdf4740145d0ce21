"""The command line: generate, model resolution (env, config file, demo, Ollama), help."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_hf, tiny_tokenizer

import mlx_mixtral
from mlx_mixtral.loading import default_model, resolve


def cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_hf(path, "mistral", sliding_window=8)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_generate_streams_reply_and_stats(folder):
    result = cli("generate", "--model", str(folder), "--prompt", "t5 t6 t7", "--temp", "0",
                 "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and all(w.startswith("t") for w in result.stdout.split())
    assert "generation: 5 tokens" in result.stderr and "tok/s" in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--top-p", "2"], "--top-p"),
    (["--model", "/nonexistent/model"], "no such file or folder"),
])
def test_generate_bad_input_one_line(folder, flags, words):
    args = ["generate", "--prompt", "hi", *flags]
    if "--model" not in flags:
        args += ["--model", str(folder)]
    result = cli(*args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("Loading")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr


def test_default_model_order(tmp_path, monkeypatch, folder):
    monkeypatch.setenv("MLX_MIXTRAL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MLX_MIXTRAL_MODEL", raising=False)
    assert default_model().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # the demo
    config = tmp_path / "config" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"model": str(folder)}))
    assert default_model() == str(folder)
    monkeypatch.setenv("MLX_MIXTRAL_MODEL", "from-env")
    assert default_model() == "from-env"


def test_ollama_store_resolves_to_the_gguf_blob(tmp_path, monkeypatch, tokens):
    from test_gguf import write_mixtral_gguf

    ref = build_hf(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    gguf_path = tmp_path / "tiny.gguf"
    write_mixtral_gguf(ref, gguf_path, merged=True)
    home = tmp_path / "home"
    models = home / ".ollama" / "models"
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    (models / "blobs").mkdir(parents=True)
    (models / "blobs" / f"sha256-{digest}").write_bytes(gguf_path.read_bytes())
    manifest = models / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    assert resolve("ollama:tiny") == models / "blobs" / f"sha256-{digest}"
    assert resolve("ollama:tiny:latest") == resolve("ollama:tiny")
    model, _ = mlx_mixtral.load("ollama:tiny", tokenizer=False)
    import mlx.core as mx
    import numpy as np
    from conftest import hf_logits

    ids = tokens(1, 8)
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(ref, ids)).max() <= 1e-4
    with pytest.raises(mlx_mixtral.WeightsError, match="ollama pull nothing"):
        resolve("ollama:nothing")


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
    for command in ("chat", "generate", "convert", "info", "bench"):
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


def test_prompt_as_argument_or_from_a_pipe(folder):
    by_argument = cli("generate", "--model", str(folder), "t5 t6 t7", "--temperature", "0",
                      "--max-tokens", "4")
    assert by_argument.returncode == 0, by_argument.stderr
    piped = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "generate", "--model",
                            str(folder), "--temp", "0", "--max-tokens", "4"], input="t5 t6 t7",
                           capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == by_argument.stdout
    twice = cli("generate", "--model", str(folder), "a", "--prompt", "b")
    assert twice.returncode == 2 and "once" in twice.stderr


@pytest.mark.parametrize("piped, prompt", [
    (b"What is 2+2?\n", "What is 2+2?"), (b"What is 2+2?\r\n", "What is 2+2?"),
    (b"two lines\n\n", "two lines\n"), (b"no newline", "no newline"),
    (b"\n", ""), (b"a\nb\n", "a\nb")])
def test_a_piped_prompt_loses_one_trailing_newline(monkeypatch, piped, prompt):
    """`echo "..." |` adds a newline the prompt as an argument does not have: exactly one
    (\\n or \\r\\n) goes (issue 27, finding 12)."""
    import io

    from mlx_mixtral.cli.generate import read_prompt

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped)))
    assert read_prompt("-") == prompt
    assert read_prompt("What is 2+2?\n") == "What is 2+2?\n"  # an argument stays as given


@pytest.mark.slow  # the demo model, twice (~12 s)
def test_echo_into_generate_is_the_prompt_as_an_argument():
    from mlx_mixtral.demo import demo_model_path

    base = [sys.executable, "-m", "mlx_mixtral.cli", "generate", "--model",
            str(demo_model_path()), "--temp", "0", "--max-tokens", "3"]
    by_argument = subprocess.run([*base, "What is 2+2?"], capture_output=True, text=True)
    piped = subprocess.run(base, input="What is 2+2?\n", capture_output=True, text=True)
    assert by_argument.returncode == 0 and piped.returncode == 0, piped.stderr

    def prompt_tokens(result) -> str:
        return result.stderr.split("prompt: ")[1].split(" tokens")[0]

    assert prompt_tokens(piped) == prompt_tokens(by_argument)
    assert piped.stdout == by_argument.stdout


@pytest.mark.alone  # a deadline
def test_chat_without_a_terminal_says_so_and_exits(folder, tmp_path):
    import time

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "--model", str(folder),
                             "--db", str(tmp_path / "c.db")], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs a terminal" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 15


def test_chat_with_an_empty_folder_fails_in_one_line_before_the_app(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("chat", "--model", str(tmp_path / "empty"), "--db", str(tmp_path / "c.db"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mlx-mixtral: error: {tmp_path / 'empty'}: no config.json in this folder; pass the "
        "folder that holds the model's config.json and weights"]


def test_errors_name_the_flags_not_the_fields(capsys):
    from mlx_mixtral.cli.main import main

    for argv, flag, field in ((["--top-p", "2"], "--top-p", "top_p"),
                              (["--max-tokens", "0"], "--max-tokens", "max_tokens"),
                              (["--repetition-penalty", "0"], "--repetition-penalty",
                               "repetition_penalty"),
                              (["--kv-bits", "5"], "--kv-bits", "kv_bits"),
                              (["--prompt-lookup", "-1"], "--prompt-lookup", "prompt_lookup"),
                              (["--model", "demo", "--max-memory", "lots"], "--max-memory",
                               "max_memory")):
        assert main(["generate", "hi", *argv]) == 2
        err = capsys.readouterr().err
        assert flag in err and field not in err, err


def test_info_memory_error_names_its_own_flag():
    """`info` calls the budget --memory: its error names that flag, not generate's
    --max-memory (issue 27, finding 7)."""
    result = cli("info", "--model", "demo", "--memory", "abc")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-mixtral: error: "), lines
    assert "--memory" in lines[0] and "--max-memory" not in lines[0] \
        and "max_memory" not in lines[0], lines[0]


def test_every_parameter_a_library_error_names_has_a_flag():
    """A library error lists the parameters it names (`params=`); the CLI finds each one's
    flag by its dest, so each must be some flag's dest."""
    import ast

    from mlx_mixtral.cli import build_parser
    from mlx_mixtral.cli.flags import flag_names
    from mlx_mixtral.generation.sampling import SETTINGS

    named = {s.name for s in SETTINGS}
    for path in Path(mlx_mixtral.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "params" and \
                    isinstance(node.value, ast.Tuple):
                named |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    assert {"max_memory", "force", "kv_bits", "pipeline"} <= named
    api_only = {"logit_bias"}  # set by requests only: no command line can get it wrong
    assert not named - api_only - set(flag_names(build_parser()))


# A sampling setting added to the table alone (as `typical_p` would be, besides its sampler):
# the CLI, both APIs, the settings screen, the HTTP engine and the errors all offer it.
NEW_SETTING = """
import pathlib, sys, types
import mlx_mixtral.generation as generation

path = pathlib.Path(generation.__file__).parent / "sampling.py"
source = path.read_text().replace("\\ndef _params_class", (
    "\\nSETTINGS = (*SETTINGS, Setting('typical_p', float, 1.0, 0.0, 1.0, 'typical (1 = off)', "
    "wire=(('ollama', 'typical'),), label='Typical-p', short='typical'))\\n"
    "\\ndef _params_class"), 1)
module = types.ModuleType("mlx_mixtral.generation.sampling")
module.__file__, module.__package__ = str(path), "mlx_mixtral.generation"
sys.modules[module.__name__] = generation.sampling = module
exec(compile(source, str(path), "exec"), module.__dict__)

from mlx_mixtral.app.widgets import changed_settings
from mlx_mixtral.app.engine import Prompt
from mlx_mixtral.app.http_engine import HttpEngine
from mlx_mixtral.app.screens import FIELDS
from mlx_mixtral.cli.flags import sampling_from, with_flags
from mlx_mixtral.cli.main import build_parser
from mlx_mixtral.errors import SamplingError
from mlx_mixtral.server.schemas import ChatRequest, OllamaOptions

parser = build_parser()
params = sampling_from(parser.parse_args(["generate", "hi", "--typical-p", "0.5"]))
body = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], typical_p=0.25)
try:
    module.SamplingParams(typical_p=2.0)
except SamplingError as e:
    error = with_flags(e, parser)
print(params.typical_p, module.requested("openai", body)["typical_p"],
      module.requested("ollama", OllamaOptions(typical=0.75))["typical_p"],
      [f.name for f in FIELDS][-1], HttpEngine("http://x").request(Prompt([]), params)["typical_p"],
      changed_settings(params), error, sep="|")
"""


def test_a_sampling_setting_is_declared_once():
    out = subprocess.run([sys.executable, "-c", NEW_SETTING], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split("|") == [
        "0.5", "0.25", "0.75", "typical_p", "0.5", "typical 0.5",
        "--typical-p must be a number between 0.0 and 1.0, got 2.0"]


def test_ctrl_c_mid_reply_ends_the_line_first(monkeypatch, capsys, folder):
    from mlx_mixtral import generation
    from mlx_mixtral.cli.main import main
    from mlx_mixtral.generation.stream import Chunk

    def interrupted(*args, **kwargs):
        yield Chunk("Half a rep", 1)
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "stream_generate", interrupted)
    assert main(["generate", "--model", str(folder), "hi"]) == 130
    out, err = capsys.readouterr()
    assert out == "Half a rep\n"
    assert err.splitlines()[-1] == "mlx-mixtral: interrupted"


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


def test_serve_on_a_port_in_use_says_so_before_loading(folder):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for _ in range(3):  # it crashed in 2 of 3 runs (issue 27)
            result = cli("serve", "--model", str(folder), "--port", str(port))
            assert result.returncode == 2, result.stderr
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("mlx-mixtral: error: "), lines
            assert str(port) in lines[0]
            assert "Loading" not in result.stderr and "terminate called" not in result.stderr


# Issue 27's command-line findings: one test (or more) each, subprocess-free where they can be.

def _sub(command: str):
    import argparse

    from mlx_mixtral.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _refusal(argv: list[str], capsys) -> str:
    """The one line stderr holds after `argv` ended with exit status 2."""
    from mlx_mixtral.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err.strip()


@pytest.mark.parametrize("argv", [
    ["generate", "--max-tokens"], ["chat", "--bogus"], ["convert", "--mlx-path", "x"],
    ["info", "--ranks", "two"], ["list", "extra"], ["bench", "--runs"],
    ["serve", "--port", "http"], ["generate", "--dtype", "float8"],
])
def test_an_argparse_mistake_is_one_line(argv, capsys):
    """Finding 6: argparse's refusals were 17-19 lines of usage; now one line naming the
    command, pointing at its --help."""
    line = _refusal(argv, capsys)
    command = argv[0]
    assert line.startswith(f"mlx-mixtral {command}: error: "), line
    assert line.endswith(f"(see mlx-mixtral {command} --help)"), line


def test_a_negative_size_is_the_flags_value_and_refused(capsys, folder):
    """Finding 6: `--max-memory -1GB` was "expected one argument"; it is the value, refused
    as a size."""
    line = _refusal(["generate", "--model", str(folder), "--max-memory", "-1GB", "hi"], capsys)
    assert line == "mlx-mixtral: error: --max-memory: '-1GB': a size must be more than 0"
    line = _refusal(["info", "--preset", "mixtral-8x7b", "--memory", "-2.5GB"], capsys)
    assert "--memory: '-2.5GB': a size must be more than 0" in line, line
    assert _sub("generate").parse_args(["--temp", "-1", "--seed", "-3"]).seed == -3


def _help_entries(command: str) -> dict[str, str]:
    """Each option's help entry in `command --help`, on one line, by its long flag."""
    import re

    text = _sub(command).format_help()
    options = text[text.index("options:"):]
    entries = re.split(r"\n  (?=-)", options)[1:]
    return {re.search(r"--[\w-]+", e).group(0): " ".join(e.split()) for e in entries}


@pytest.mark.parametrize("command", ["chat", "generate", "convert", "info", "list", "bench",
                                     "serve"])
def test_help_says_each_default_once(command):
    """Finding 18: no second "(default: None)" after a default said in words, none for a
    required flag, no "(default: [])", no "%%"."""
    text = _sub(command).format_help()
    assert "%%" not in text and "(default: None)" not in text and "(default: [])" not in text
    for entry in _help_entries(command).values():
        assert entry.count("(default") <= 1, entry
    parser = _sub(command)
    for action in parser._actions:
        if action.required:
            assert "(default" not in _help_entries(command)[action.option_strings[-1]]


def test_help_entries_read_as_written():
    """Finding 18, snapshot-like: entries the issue named, as the reader sees them."""
    assert _help_entries("generate")["--dtype"] == (
        "--dtype {float32,float16,bfloat16} compute in this dtype (default: float32 on the CPU "
        "backend, the checkpoint's own on Metal)")
    assert _help_entries("convert")["--hf-path"] == (
        "--hf-path HF_PATH source folder (config.json + safetensors)")
    assert _help_entries("generate")["--top-p"].endswith("(default: 0.95)")
    assert _help_entries("serve")["--cors-origin"].count("(default") == 0
    for flag in ("--max-memory", "--kv-bits"):
        assert _help_entries("bench")[flag].count("(default") == 1
    assert _help_entries("chat")["--db"].count("(default") == 1
    assert "(sizes, shares of the model's size, or min: min,50%,75%)" in " ".join(
        _sub("bench").format_help().split())


def test_too_small_a_budget_for_a_dense_model_says_why(capsys):
    """Finding 20: `--max-memory 1KB` said "0.0 MB", spoke of experts and suggested converting
    the demo's GGUF."""
    line = _refusal(["generate", "--model", "demo", "--max-memory", "1KB", "hi"], capsys)
    assert "--max-memory 1.0 KB is too small for SmolLM2-135M-Instruct.Q4_1.gguf" in line
    assert "0.0" not in line and "expert" not in line and "convert" not in line, line
    assert "GGUF file quantized with fewer bits" in line


def test_sizes_read_in_the_unit_that_fits():
    from mlx_mixtral.units import parse_size, size

    for text in ("1KB", "23040", "98.4MB", "25.3GB"):
        assert size(parse_size(text)) == {"1KB": "1.0 KB", "23040": "23.0 KB",
                                          "98.4MB": "98.4 MB", "25.3GB": "25.3 GB"}[text]
    assert size(512) == "512 bytes"


def test_the_package_lists_only_its_public_api():
    """Finding 25: dir(mlx_mixtral) listed TYPE_CHECKING, annotations, lazy, jsonfile,
    units. (The light import is tests/test_layout.py's.)"""
    import mlx_mixtral.jsonfile  # noqa: F401 - submodules land in the namespace when imported
    import mlx_mixtral.units  # noqa: F401

    public = [n for n in dir(mlx_mixtral) if not n.startswith("__")]
    assert public == sorted(mlx_mixtral.__all__)
    assert "__version__" in dir(mlx_mixtral)


def test_a_single_safetensors_file_is_told_what_a_model_is(capsys, folder, tmp_path):
    """Finding 21: a .safetensors file as --model was told it is "not a GGUF file"."""
    (weights,) = folder.glob("*.safetensors")
    line = _refusal(["info", "--model", str(weights)], capsys)
    assert line == (f"mlx-mixtral: error: {weights}: a single weights file is not a model: a "
                    "model is a folder with config.json and its .safetensors weights, or a "
                    f".gguf file; give its folder, {folder}")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(weights.read_bytes())
    line = _refusal(["generate", "--model", str(alone), "hi"], capsys)
    assert "a folder with config.json" in line and "give its folder" not in line, line


def test_a_refused_chat_creates_no_database(capsys, folder, tmp_path):
    """Finding 16: `chat --db <in a missing folder>` created the folder and the database, then
    refused to run (no terminal); every refusal now comes first."""
    db = tmp_path / "missing" / "deeper" / "chats.db"
    for argv in (["chat", "--model", str(folder)], ["chat", "--model", str(tmp_path / "no")],
                 ["chat", "--server", "http://127.0.0.1:9"]):
        line = _refusal([*argv, "--db", str(db)], capsys)  # pytest's stdin is no terminal
        assert line.startswith("mlx-mixtral: error: "), line
        assert not (tmp_path / "missing").exists(), argv


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
    assert _refusal(["bench", *argv], capsys).startswith("mlx-mixtral: error: ")


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
    for flag in (["--compare", "mlx-lm"], ["--max-memory", "min"]):
        line = _refusal(["bench", "--model", "demo", *flag], capsys)
        assert flag[0] in line and "convert" not in line, line


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
