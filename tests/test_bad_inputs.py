"""The bad-input corpus: each case damages a tiny model (or the command line) one way.

From the CLI each gets exit status 2, one line on stderr naming what went wrong and where, no
traceback and nothing on stdout; from the Python API, the documented exception type."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_files import (
    patch_bytes,
    safetensors_parts,
    u64,
    write_llama_gguf,
    write_safetensors,
)
from conftest import build_hf, tiny_tokenizer

import mlx_mixtral
from mlx_mixtral import (
    ChatFormatError,
    ConfigError,
    MemoryLimitError,
    TokenizerError,
    WeightsError,
)
from mlx_mixtral.app.store import Store, StoreError
from mlx_mixtral.cli import build_parser, main, sampling_from
from mlx_mixtral.errors import GenerationError, MlxMixtralError, SamplingError

CONTEXT = 64  # the tiny model's context, so that a long prompt is easy to write


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pristine")
    build_hf(folder, "mistral", max_position_embeddings=CONTEXT)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pristine_gguf(tmp_path_factory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ---- ways to damage a model folder or GGUF file --------------------------------------------


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def configured(**changes) -> Callable[[Env], list[str]]:
    """The case's command line, on the folder whose config.json has `changes` (None: drop)."""
    return lambda env: damaged(env, lambda f: edit_config(f, **changes))


def removed(name: str) -> Callable[[Env], list[str]]:
    return lambda env: damaged(env, lambda f: (f / name).unlink())


def rewritten(name: str, text: str) -> Callable[[Env], list[str]]:
    return lambda env: damaged(env, lambda f: (f / name).write_text(text))


def edit_header(folder: Path, edit: Callable[[dict], None]) -> None:
    header, data = safetensors_parts(weights(folder))
    edit(header)
    write_safetensors(weights(folder), header, data)


def first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def gguf_copy(src: Path, dst: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copy(src, dst)
    damage(dst)
    return dst


@dataclass
class Env:
    folder: Path  # a copy of the pristine model folder, to damage
    gguf: Path  # the pristine GGUF (copy it before damaging)
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


def gen(model: Path | str, *flags: str, prompt: str = "t5 t6 t7") -> list[str]:
    return ["generate", "--model", str(model), "--prompt", prompt, "--max-tokens", "3", *flags]


def damaged(env: Env, damage: Callable[[Path], None]) -> list[str]:
    damage(env.folder)
    return gen(env.folder)


def damaged_gguf(env: Env, damage: Callable[[Path], None]) -> list[str]:
    return gen(gguf_copy(env.gguf, env.tmp / "bad.gguf", damage))


def nan_weights(folder: Path, value: float) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(weights(folder))
    tensors["model.norm.weight"][:] = value
    save_file(tensors, weights(folder), metadata={"format": "pt"})


def garbage_db(env: Env) -> list[str]:
    db = env.tmp / "chats.db"
    db.write_bytes(b"this is not a database" * 100)
    return ["chat", "--model", str(env.folder), "--db", str(db)]


def future_db(env: Env) -> list[str]:
    db = env.tmp / "chats.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA user_version = 99")
    return ["chat", "--model", str(env.folder), "--db", str(db)]


def too_big(env: Env) -> list[str]:
    env.monkeypatch.setattr("mlx_mixtral.loading.memory.available_memory", lambda: 10_000)
    return gen(env.folder)


def bad_user_config(env: Env) -> list[str]:
    config = env.tmp / "config" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text("[1, 2")
    env.monkeypatch.setenv("MLX_MIXTRAL_CONFIG_DIR", str(config.parent))
    env.monkeypatch.delenv("MLX_MIXTRAL_MODEL", raising=False)
    return ["generate", "--prompt", "hi"]


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    words: tuple[str, ...]  # all in the one error line
    error: type[MlxMixtralError]  # what the Python API raises


CASES = [
    # safetensors
    Case("safetensors header length lies",
         lambda e: damaged(e, lambda f: patch_bytes(weights(f), 0, u64(10**9))),
         ("model.safetensors", "truncated or corrupt", "download it again"), WeightsError),
    Case("safetensors header is JSON garbage",
         lambda e: damaged(e, lambda f: write_safetensors(weights(f), {}, b"")
                           or patch_bytes(weights(f), 8, b"{x")),
         ("model.safetensors", "not JSON"), WeightsError),
    Case("safetensors offsets past the end",
         lambda e: damaged(e, lambda f: edit_header(
             f, lambda h: first_tensor(h).update(data_offsets=[0, 10**12]))),
         ("model.safetensors", "past the end of the file", "download it again"), WeightsError),
    Case("safetensors file of 3 bytes",
         lambda e: damaged(e, lambda f: weights(f).write_bytes(b"abc")),
         ("model.safetensors", "no header"), WeightsError),
    Case("safetensors header not an object",
         lambda e: damaged(e, lambda f: write_safetensors(weights(f), [1, 2], b"")),
         ("model.safetensors", "corrupt safetensors header"), WeightsError),
    Case("safetensors unknown dtype",
         lambda e: damaged(e, lambda f: edit_header(f, lambda h: first_tensor(h).update(
             dtype="Q9"))),
         ("model.safetensors", "cannot read safetensors"), WeightsError),
    # GGUF
    Case("gguf bad magic",
         lambda e: damaged_gguf(e, lambda p: patch_bytes(p, 0, b"GGML")),
         ("bad.gguf", "not a GGUF file"), WeightsError),
    Case("gguf truncated tensor data",
         lambda e: damaged_gguf(e, lambda p: p.write_bytes(p.read_bytes()[:-3000])),
         ("bad.gguf", "past the end of the file", "download it again"), WeightsError),
    Case("gguf absurd tensor count",
         lambda e: damaged_gguf(e, lambda p: patch_bytes(p, 8, u64(2**60))),
         ("bad.gguf", "claims 1152921504606846976 tensors"), WeightsError),
    Case("gguf absurd metadata count",
         lambda e: damaged_gguf(e, lambda p: patch_bytes(p, 16, u64(2**62))),
         ("bad.gguf", "metadata entries"), WeightsError),
    Case("gguf absurd string length",
         lambda e: damaged_gguf(e, lambda p: patch_bytes(p, 24, u64(2**50))),
         ("bad.gguf", "bytes of a string"), WeightsError),
    Case("gguf unsupported version",
         lambda e: damaged_gguf(e, lambda p: patch_bytes(p, 4, (7).to_bytes(4, "little"))),
         ("bad.gguf", "GGUF version 7"), WeightsError),
    Case("gguf empty file",
         lambda e: damaged_gguf(e, lambda p: p.write_bytes(b"")),
         ("bad.gguf", "not a GGUF file"), WeightsError),
    Case("gguf of another architecture",
         lambda e: gen(write_llama_gguf(e.tmp / "bad.gguf", arch="gpt2")),
         ("bad.gguf", "architecture 'gpt2' is not supported"), ConfigError),
    Case("gguf metadata disagrees with the tensors",
         lambda e: gen(write_llama_gguf(e.tmp / "bad.gguf", embedding_length=128)),
         ("bad.gguf", "disagrees with the config"), WeightsError),
    # config.json
    Case("config.json missing",
         removed("config.json"),
         ("no config.json",), ConfigError),
    Case("config.json not JSON",
         rewritten("config.json", "{'hidden': 1"),
         ("config.json", "not valid JSON"), ConfigError),
    Case("config.json a list",
         rewritten("config.json", "[1]"),
         ("config.json", "expected a JSON object"), ConfigError),
    Case("config.json lacks fields",
         configured(hidden_size=None, vocab_size=None),
         ("config.json", "missing required key(s): vocab_size, hidden_size"), ConfigError),
    Case("config.json wrongly typed field",
         configured(hidden_size="64"),
         ("config.json", "hidden_size must be a positive integer, got '64'"), ConfigError),
    Case("config.json unknown model_type",
         configured(model_type="mamba"),
         ("config.json", "unsupported model_type 'mamba'"), ConfigError),
    Case("config hidden size disagrees with the weights",
         configured(hidden_size=128, head_dim=32),
         ("model.norm.weight", "disagrees with the config (128)"), WeightsError),
    Case("config layer count disagrees with the weights",
         configured(num_hidden_layers=5),
         ("config says 5 layers but the weights hold 2",), WeightsError),
    Case("a weight missing",
         lambda e: damaged(e, lambda f: edit_header(
             f, lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))),
         ("weights do not match the config", "up_proj"), WeightsError),
    # pickles, folders, tokenizers
    Case("only pickled weights in the folder",
         lambda e: damaged(e, lambda f: weights(f).rename(f / "pytorch_model.bin")),
         ("pytorch_model.bin", "refused", "safetensors"), WeightsError),
    Case("a pickle file as the model",
         lambda e: gen(e.tmp / "model.pt") if (e.tmp / "model.pt").write_bytes(
             b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.") else [],
         ("model.pt", "pickled weights are refused"), WeightsError),
    Case("an empty folder",
         lambda e: gen(e.tmp / "empty") if (e.tmp / "empty").mkdir() is None else [],
         ("empty", "no config.json"), ConfigError),
    Case("no such model",
         lambda e: gen(e.tmp / "nowhere"),
         ("nowhere", "no such file or folder"), WeightsError),
    Case("tokenizer missing",
         removed("tokenizer.json"),
         ("no tokenizer.model or tokenizer.json",), TokenizerError),
    Case("tokenizer.json corrupt",
         rewritten("tokenizer.json", "{\"model\": 7}"),
         ("tokenizer.json", "unreadable"), TokenizerError),
    # prompts and sampling
    Case("prompt longer than the context",
         lambda e: gen(e.folder, prompt=" ".join(["t5"] * 100)),
         ("the prompt is", f"the model's context is {CONTEXT}", "shorten it"), GenerationError),
    Case("empty raw prompt",
         lambda e: gen(e.folder, "--raw", prompt=""),
         ("the prompt is empty",), GenerationError),
    Case("max_tokens 0",
         lambda e: gen(e.folder, "--max-tokens", "0"),
         ("must be an integer >= 1, got 0",), SamplingError),
    Case("max_tokens negative",
         lambda e: gen(e.folder, "--max-tokens", "-5"),
         ("must be an integer >= 1, got -5",), SamplingError),
    Case("negative temperature",
         lambda e: gen(e.folder, "--temp", "-1"),
         ("must be a number between 0.0 and 100.0, got -1.0",), SamplingError),
    Case("NaN logits from corrupted weights",
         lambda e: damaged(e, lambda f: nan_weights(f, float("nan"))),
         ("not a number", "corrupt"), GenerationError),
    Case("inf logits from corrupted weights",
         lambda e: damaged(e, lambda f: nan_weights(f, float("inf"))),
         ("not a number", "corrupt"), GenerationError),
    Case("a chat format the vocabulary cannot write",
         lambda e: gen(e.folder, "--chat-format", "mistral-v3"),
         ("mistral-v3 needs [INST] control tokens",), ChatFormatError),
    # resources, stores, settings
    Case("model larger than the available memory",
         too_big, ("needs about", "--force", "is available"), MemoryLimitError),
    Case("conversation database is garbage", garbage_db,
         ("chats.db", "cannot open the conversation database"), StoreError),
    Case("conversation database from a newer version", future_db,
         ("chats.db", "newer mlx-mixtral", "schema 99"), StoreError),
    Case("user config file is not JSON", bad_user_config,
         ("config.json", "not valid JSON"), ConfigError),
    Case("ollama model not pulled",
         lambda e: gen("ollama:nothing-here") if e.monkeypatch.setenv(
             "OLLAMA_MODELS", str(e.tmp)) is None else [],
         ("ollama:nothing-here", "ollama pull nothing-here"), WeightsError),
]


@pytest.fixture
def env(pristine, pristine_gguf, tmp_path, monkeypatch) -> Env:
    folder = tmp_path / "model"
    shutil.copytree(pristine, folder)
    return Env(folder, pristine_gguf, tmp_path, monkeypatch)


def test_the_corpus_is_big_and_distinct():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_one_line_exit_2(case, env, capsys):
    argv = case.argv(env)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("Loading ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("mlx-mixtral: error: ")
    for word in case.words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in err
    assert out == ""  # no partial reply


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_folder_without_a_tokenizer_is_refused_before_loading(command, env, capsys):
    """generate and chat refuse it in the load plan as serve does (test_server_stop): one
    line and no "Loading ..." line (a command that skipped the plan's check would refuse
    only once the load looked for the tokenizer, which the corpus above lets pass)."""
    (env.folder / "tokenizer.json").unlink()
    argv = gen(env.folder) if command == "generate" else ["chat", "--model", str(env.folder)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and "no tokenizer.model or tokenizer.json" in lines[0], err
    assert out == ""


def run_api(argv: list[str]) -> None:
    """What the command does, through the Python API."""
    args = build_parser().parse_args(argv)
    if args.command == "chat":
        mlx_mixtral.load(args.model)
        Store(args.db).close()
        return
    sampling = sampling_from(args)
    model, tokenizer = mlx_mixtral.load(args.model)
    mlx_mixtral.generate(model, tokenizer, args.prompt, sampling=sampling, raw=args.raw,
                         chat_format=args.chat_format)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_api_raises_the_documented_type(case, env):
    with pytest.raises(case.error) as info:
        run_api(case.argv(env))
    assert type(info.value) is case.error
    assert case.words[-1] in str(info.value)


def test_non_utf8_prompt_is_replaced_with_a_warning(env, capsysbinary):
    """Not refused: the undecodable bytes become U+FFFD and the reply comes."""
    import os

    argv = gen(env.folder, "--temp", "0", prompt=os.fsdecode(b"t5 \xff\xfe t6"))
    assert main(argv) == 0
    out, err = capsysbinary.readouterr()
    assert b"not UTF-8; they were replaced by U+FFFD" in err
    assert out.strip()


def test_force_loads_a_model_that_looks_too_big(env, capsys):
    argv = too_big(env)
    assert main([*argv, "--force"]) == 0
    with pytest.raises(MemoryLimitError, match="pass force=True"):  # the parameter, not the flag
        mlx_mixtral.load(env.folder)
    mlx_mixtral.load(env.folder, force=True)
