"""The models this machine has: `mlx-mixtral list`, and the app's picker switching models
mid-chat. The Hugging Face cache, the Ollama store and the data folder are fakes in tmp."""

from __future__ import annotations

import http.server
import json
import shutil
import threading

import pytest
from app_helpers import tiny_model_folder, wait_until

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.http_engine import HttpEngine
from mlx_mixtral.app.mlx_engine import MlxEngine
from mlx_mixtral.app.screens import ModelPickerScreen
from mlx_mixtral.app.store import Store
from mlx_mixtral.app.widgets import AssistantMessage, PromptInput
from mlx_mixtral.catalog.local import LocalModel, local_models
from mlx_mixtral.cli.main import main
from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.generation.sampling import SamplingParams

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A converted folder (through `convert`), an Ollama model, an HF cache entry, the demo."""
    monkeypatch.setenv("MLX_MIXTRAL_DATA_DIR", str(tmp_path / "data"))
    source = tiny_model_folder(tmp_path / "hf-tiny")
    converted = tmp_path / "tiny-mlx"
    assert main(["convert", "--hf-path", str(source), "--mlx-path", str(converted)]) == 0
    shutil.copyfile(source / "tokenizer.model", converted / "tokenizer.model")

    ollama = tmp_path / "ollama"
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / "sha256-feed").symlink_to(demo_model_path())
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "tinyllama" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:feed"}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))

    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-mixtral" / "snapshots" / REVISION
    shutil.copytree(source, snapshot)
    (hub / "models--someone--tiny-mixtral" / "refs").mkdir()
    (hub / "models--someone--tiny-mixtral" / "refs" / "main").write_text(REVISION)
    (hub / "models--someone--not-a-model" / "snapshots" / REVISION).mkdir(parents=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    return converted, hub


def test_the_list_has_every_kind(machine, capsys):
    converted, hub = machine
    names = {m.name: m for m in local_models(hub)}
    assert set(names) == {str(converted.resolve()), "someone/tiny-mixtral",
                          "ollama:tinyllama:latest", "demo"}
    assert names["ollama:tinyllama:latest"].disk_bytes == demo_model_path().stat().st_size
    assert all(m.memory_bytes > 0 for m in names.values())

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out
    assert "FITS" in out and "available now" in out


def test_a_deleted_folder_leaves_the_list(machine):
    converted, hub = machine
    shutil.rmtree(converted)
    assert str(converted.resolve()) not in {m.name for m in local_models(hub)}


async def test_the_picker_switches_models_mid_chat(machine, tmp_path):
    converted, hub = machine
    settings = SamplingParams(temperature=0, max_tokens=6)
    app = ChatApp(MlxEngine(str(converted)), str(converted), Store(tmp_path / "chats.db"),
                  settings=settings)  # Ctrl+O lists what `local_models` finds (the fakes)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.info is not None)
        prompt = app.query_one(PromptInput)
        prompt.text = "Hello"
        done = app.replies_done
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_done > done)
        first_model = app.info.name

        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen))
        picker = app.screen
        assert {m.name for m in picker.models} >= {"demo", "ollama:tinyllama:latest",
                                                   str(converted.resolve())}
        picker.query_one("#models").highlighted = [m.name for m in picker.models].index("demo")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.info is not None and app.info.name != first_model,
                         timeout=60)
        assert app.model_name == "demo" and app.focused is prompt
        # The open chat goes on with the new model.
        prompt.text = "And now?"
        done = app.replies_done
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.replies_done > done)
        assert len(app.query(AssistantMessage)) == 2
        assert app.store.load(app.conversation.id).model == "demo"


SERVED = ["served-a", "org/served-b"]


class _Models(http.server.BaseHTTPRequestHandler):
    """A server that only lists its models (GET /v1/models), as OpenAI's API does."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": name, "object": "model"}
                                                      for name in SERVED]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def models_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_the_picker_under_a_server_lists_the_servers_models(models_server, tmp_path,
                                                                  monkeypatch):
    from textual.widgets import Static

    # A model on this machine, which a chat with a server must not offer.
    here = LocalModel(str(tmp_path / "local-model"), "local", 1, 1)
    monkeypatch.setattr("mlx_mixtral.catalog.local.local_models", lambda *_, **__: [here])
    engine = HttpEngine(models_server)
    app = ChatApp(engine, models_server, Store(tmp_path / "chats.db"))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.info is not None)
        assert app.info.name == "served-a"  # the server's first, as --model was not given
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPickerScreen))
        picker = app.screen
        assert [m.name for m in picker.models] == SERVED
        assert any(engine.base in str(w.render()) for w in picker.query(Static))
        picker.query_one("#models").highlighted = 1
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.info is not None and app.info.name == SERVED[1])
        assert app.model_name == SERVED[1]
