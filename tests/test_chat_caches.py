"""Saved KV caches in chat (reopened chats prefill only what is new; damaged files ignored;
the budget) and `generate --prompt-cache` on the command line."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from kv_helpers import build_models, filled

from mlx_mixtral.errors import PromptCacheError
from mlx_mixtral.generation import ChatSession, Stats
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.loading.prompt_cache import load_prompt_cache, save_prompt_cache


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory)


# ---- saved caches in chat -----------------------------------------------------------------


class Counting:
    """The model, counting the tokens it is given."""

    def __init__(self, model) -> None:
        self.model, self.seen = model, 0
        self.args, self.layers = model.args, model.layers

    def make_cache(self, slack: int = 0) -> list:
        return self.model.make_cache(slack)

    def __call__(self, inputs, cache=None, **kw):
        self.seen += inputs.shape[1]
        return self.model(inputs, cache=cache, **kw)


@pytest.mark.slow
def test_reopened_chat_prefills_only_the_new_message(tmp_path):
    from app_helpers import tiny_model_folder

    from mlx_mixtral import load
    from mlx_mixtral.app.chat_caches import ChatCaches
    from mlx_mixtral.app.engine import Prompt
    from mlx_mixtral.app.mlx_engine import MlxEngine

    folder = tiny_model_folder(tmp_path / "tiny")
    model, tokenizer = load(folder)
    words = " ".join(f"w{i}" for i in range(300))
    session = ChatSession(model, tokenizer, sampling=SamplingParams(temperature=0, max_tokens=40))
    while len(session.cached) < 2000:
        list(session.send(words))
    history = session.messages
    caches = ChatCaches(tmp_path / "caches")
    engine = MlxEngine(str(folder), caches=caches)
    engine.load(lambda _: None)
    engine.session, engine.key = session, "7"  # the chat stored as 7
    engine._save()  # what a completed reply does

    restarted = MlxEngine(str(folder), caches=caches)  # a new app: nothing in memory
    restarted.load(lambda _: None)
    counting = Counting(restarted.session.model)
    restarted.session.model = counting
    message = " ".join(["the"] * 20)
    assert len(tokenizer.encode(message)) == 20
    restarted.reply(Prompt([*history, {"role": "user", "content": message}], None, "7"),
                    SamplingParams(temperature=0, max_tokens=1), lambda e: None, lambda: False)
    framing = len(tokenizer.encode("[INST]  [/INST]"))
    assert len(session.cached) >= 2000
    # the message, its [INST] framing, the last reply's EOS, the token sampled
    assert counting.seen <= 20 + framing + 3


def test_damaged_cache_in_the_app_is_ignored(tmp_path, caplog):
    from app_helpers import tiny_model_folder

    from mlx_mixtral.app.chat_caches import ChatCaches
    from mlx_mixtral.app.engine import Prompt
    from mlx_mixtral.app.mlx_engine import MlxEngine

    caches = ChatCaches(tmp_path / "caches")
    caches.folder.mkdir()
    caches.path("3").write_bytes(b"not a cache at all")
    engine = MlxEngine(str(tiny_model_folder(tmp_path / "tiny")), caches=caches)
    engine.load(lambda _: None)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    events = []
    with caplog.at_level("WARNING"):  # opened (and its reading stopped at once)
        engine.prefill(Prompt(chat, None, "3"), events.append, lambda: True)
    assert not caches.path("3").exists() and "ignored" in caplog.text
    engine.reply(Prompt([*chat, {"role": "user", "content": "again"}], None, "3"),
                 SamplingParams(temperature=0, max_tokens=3), events.append, lambda: False)
    assert isinstance(events[-1], Stats) and events[-1].error is None
    assert caches.path("3").exists()  # saved afresh after the reply


def test_cache_files_keep_to_their_budget(tmp_path):
    from mlx_mixtral.app.chat_caches import ChatCaches

    caches = ChatCaches(tmp_path, budget=250)
    for i in range(5):
        caches.path(str(i)).write_bytes(b"x" * 100)
        import os

        os.utime(caches.path(str(i)), (i, i))
    caches.used("0")  # the oldest, but just used
    caches.evict()
    assert sorted(p.name for p in caches.files()) == [
        "conversation-0.safetensors", "conversation-4.safetensors"]


def test_json_metadata_is_plain(models, tmp_path):
    save_prompt_cache(tmp_path / "c.safetensors", filled(models["mixtral"], 4), {"a": "b"},
                      model=models["mixtral"], tokens=[1, 2, 3, 4])
    _, meta = mx.load(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert json.loads(meta["tokens"]) == [1, 2, 3, 4] and meta["format"]



def test_tokens_that_do_not_match_the_cache_are_refused_at_save(models, tmp_path):
    """Refused when saved, naming `tokens` (a file written anyway would fail to load, blaming
    the file)."""
    path = tmp_path / "c.safetensors"
    for wrong in ([1, 2, 3], [1, 2, 3, 4, 5]):
        with pytest.raises(PromptCacheError, match="tokens has .* 4 positions"):
            save_prompt_cache(path, filled(models["mixtral"], 4), tokens=wrong)
        assert not path.exists()


# ---- the command line ---------------------------------------------------------------------


def one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("mlx-mixtral: error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from app_helpers import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny-cli"))


def test_cli_prompt_cache_reused_and_refused_for_another_model(tiny_folder, tmp_path, cli_here):
    from mlx_mixtral.demo import demo_model_path

    path = str(tmp_path / "doc.safetensors")
    base = ["generate", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "4",
            "--prompt-cache", path]
    first = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 40 + "Summarise.")
    assert first.returncode == 0, first.stderr
    again = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 40 + "Shorter.")
    assert again.returncode == 0, again.stderr
    reused = int(again.stderr.split("Prompt cache: ")[1].split()[0])
    assert reused >= 80  # the document was not prefilled again
    other = cli_here("generate", "--model", str(demo_model_path()), "--prompt", "hi",
                "--prompt-cache", path)
    one_line_error(other, "another model")


def test_cli_prompt_cache_in_a_folder_is_one_line_before_loading(tiny_folder, tmp_path, cli_here):
    result = cli_here("generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens",
                      "2", "--prompt-cache", str(tmp_path))
    one_line_error(result, "--prompt-cache", str(tmp_path), "folder")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no "Loading" line


def test_cli_prompt_cache_named_without_safetensors_round_trips(tiny_folder, tmp_path, cli_here):
    path = tmp_path / "cache.bin"
    base = ["generate", "--model", str(tiny_folder), "--temp", "0", "--max-tokens", "2",
            "--prompt-cache", str(path)]
    first = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 20 + "Summarise.")
    assert first.returncode == 0, first.stderr
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no partial file left
    again = cli_here(*base, "--prompt", "A long document: " + "lorem ipsum " * 20 + "Shorter.")
    assert again.returncode == 0, again.stderr
    assert int(again.stderr.split("Prompt cache: ")[1].split()[0]) >= 40


def test_prompt_cache_api_reads_and_writes_any_file_name(models, tmp_path):
    model = models["mistral"]
    for name in ("cache.bin", "cache", "cache.npz"):
        save_prompt_cache(tmp_path / name, filled(model, 12), model=model, tokens=list(range(12)))
        loaded, meta = load_prompt_cache(tmp_path / name, return_metadata=True, model=model)
        assert meta["tokens"] == list(range(12)) and loaded[0].offset == 12


def test_cli_bad_drafting_and_kv_flags(tiny_folder, cli_here):
    from mlx_mixtral.demo import demo_model_path

    base = ["generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "3"]
    one_line_error(cli_here(*base, "--draft-model", str(demo_model_path())), "--draft-model",
                   "vocabulary (49152 tokens)", "(32000 tokens)")
    one_line_error(cli_here(*base, "--kv-bits", "5"), "--kv-bits must be one of 4, 8")
    one_line_error(cli_here(*base, "--prompt-lookup", "2", "--draft-model", "x"), "exclude")
    ok = cli_here(*base, "--prompt-lookup", "3", "--temp", "0")
    assert ok.returncode == 0 and "drafts accepted" in ok.stderr, ok.stderr
