"""The command line: generate, model resolution (env, config file, demo, Ollama), help."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli, in_process, refusal, subparser, tiny_folder
from conftest import build_hf

import mlx_mixtral
from mlx_mixtral.loading import default_model, resolve


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"))


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


def test_prompt_as_argument_or_from_a_pipe(folder, capsys):
    """A real pipe into a real process; the prompt as an argument (and twice) by `main` here."""
    by_argument = in_process(capsys, "generate", "--model", str(folder), "t5 t6 t7",
                             "--temperature", "0", "--max-tokens", "4")
    assert by_argument.returncode == 0, by_argument.stderr
    piped = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "generate", "--model",
                            str(folder), "--temp", "0", "--max-tokens", "4"], input="t5 t6 t7",
                           capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == by_argument.stdout
    twice = in_process(capsys, "generate", "--model", str(folder), "a", "--prompt", "b")
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


@pytest.mark.slow  # the demo model, twice (~8 s)
def test_echo_into_generate_is_the_prompt_as_an_argument(capsys):
    """`echo` into a real process; the prompt as an argument by `main` here."""
    from mlx_mixtral.demo import demo_model_path

    base = ["generate", "--model", str(demo_model_path()), "--temp", "0", "--max-tokens", "3"]
    by_argument = in_process(capsys, *base, "What is 2+2?")
    piped = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *base],
                           input="What is 2+2?\n", capture_output=True, text=True)
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


@pytest.mark.parametrize("argv", [
    ["generate", "--max-tokens"], ["chat", "--bogus"], ["convert", "--mlx-path", "x"],
    ["info", "--ranks", "two"], ["list", "extra"], ["bench", "--runs"],
    ["serve", "--port", "http"], ["generate", "--dtype", "float8"],
])
def test_an_argparse_mistake_is_one_line(argv, capsys):
    """Finding 6: argparse's refusals were 17-19 lines of usage; now one line naming the
    command, pointing at its --help."""
    line = refusal(argv, capsys)
    command = argv[0]
    assert line.startswith(f"mlx-mixtral {command}: error: "), line
    assert line.endswith(f"(see mlx-mixtral {command} --help)"), line


def test_a_mistyped_command_is_named_not_blamed_on_chat(capsys):
    """`generat --prompt hi` was chat's "ambiguous option: --prompt could match ...": a first
    word that names no command is refused as such, with the likeliest one."""
    line = refusal(["generat", "--prompt", "hi"], capsys)
    assert line.startswith("mlx-mixtral: error: unknown command 'generat' (did you mean "
                           "generate?); the commands: chat, generate,"), line
    assert "chat:" not in refusal(["foo"], capsys)


def test_a_negative_size_is_the_flags_value_and_refused(capsys, folder):
    """Finding 6: `--max-memory -1GB` was "expected one argument"; it is the value, refused
    as a size."""
    line = refusal(["generate", "--model", str(folder), "--max-memory", "-1GB", "hi"], capsys)
    assert line == "mlx-mixtral: error: --max-memory: '-1GB': a size must be more than 0"
    line = refusal(["info", "--preset", "mixtral-8x7b", "--memory", "-2.5GB"], capsys)
    assert "--memory: '-2.5GB': a size must be more than 0" in line, line
    assert subparser("generate").parse_args(["--temp", "-1", "--seed", "-3"]).seed == -3


def test_the_package_lists_only_its_public_api():
    """Finding 25: dir(mlx_mixtral) listed TYPE_CHECKING, annotations, lazy, jsonfile,
    units. (The light import is tests/test_layout.py's.)"""
    import mlx_mixtral.jsonfile  # submodules land in the namespace when imported
    import mlx_mixtral.units

    public = [n for n in dir(mlx_mixtral) if not n.startswith("__")]
    assert public == sorted(mlx_mixtral.__all__)
    assert "__version__" in dir(mlx_mixtral)


def test_a_single_safetensors_file_is_told_what_a_model_is(capsys, folder, tmp_path):
    """Finding 21: a .safetensors file as --model was told it is "not a GGUF file"."""
    (weights,) = folder.glob("*.safetensors")
    line = refusal(["info", "--model", str(weights)], capsys)
    assert line == (f"mlx-mixtral: error: {weights}: a single weights file is not a model: a "
                    "model is a folder with config.json and its .safetensors weights, or a "
                    f".gguf file; give its folder, {folder}")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(weights.read_bytes())
    line = refusal(["generate", "--model", str(alone), "hi"], capsys)
    assert "a folder with config.json" in line and "give its folder" not in line, line


def test_a_refused_chat_creates_no_database(capsys, folder, tmp_path):
    """Finding 16: `chat --db <in a missing folder>` created the folder and the database, then
    refused to run (no terminal); every refusal now comes first."""
    db = tmp_path / "missing" / "deeper" / "chats.db"
    for argv in (["chat", "--model", str(folder)], ["chat", "--model", str(tmp_path / "no")],
                 ["chat", "--server", "http://127.0.0.1:9"]):
        line = refusal([*argv, "--db", str(db)], capsys)  # pytest's stdin is no terminal
        assert line.startswith("mlx-mixtral: error: "), line
        assert not (tmp_path / "missing").exists(), argv










