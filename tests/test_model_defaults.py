"""A model's own sampling defaults (issue 27's first impression): the 135M demo loops at the
general defaults, so it gets gentler ones wherever the user set nothing: the chat app, generate
and serve."""

from __future__ import annotations

import pytest
from app_helpers import FakeEngine, wait_until

from mlx_mixtral.app.chat_app import ChatApp
from mlx_mixtral.app.engine import Prompt
from mlx_mixtral.app.mlx_engine import MlxEngine
from mlx_mixtral.app.store import Store
from mlx_mixtral.cli.flags import given_sampling, sampling_from
from mlx_mixtral.cli.main import build_parser
from mlx_mixtral.generation.sampling import MODEL_DEFAULTS, ModelDefaults, SamplingParams
from mlx_mixtral.generation.stats import Chunk

QUESTION = "What is the capital of France?"
DEMO = ModelDefaults("demo", MODEL_DEFAULTS["demo"])


@pytest.fixture(scope="module")
def demo_engine():
    """The demo loaded as the chat app loads it."""
    engine = MlxEngine("demo")
    engine.load(lambda _: None)
    return engine


def test_the_loader_gives_the_demo_its_defaults_and_no_other_model(demo_engine, tmp_path):
    assert demo_engine.info.defaults == DEMO
    assert DEMO.describe() == "demo defaults: temp 0.2, penalty 1.1"
    from app_helpers import tiny_model_folder

    other = MlxEngine(str(tiny_model_folder(tmp_path / "tiny")))
    assert other.load(lambda _: None).defaults == ModelDefaults()


@pytest.mark.slow
def test_the_demo_at_its_defaults_names_paris_for_ten_seeds(demo_engine):
    """The acceptance: a fresh chat, the app's engine and the app's settings (the defaults with
    the model's own applied, as the app applies them), 10 seeds, within 40 tokens."""
    answers = []
    for seed in range(10):
        settings = demo_engine.info.defaults.apply(SamplingParams(seed=seed, max_tokens=40),
                                                   given={"seed", "max_tokens"})
        chunks: list = []

        def named(chunks: list = chunks) -> bool:  # (once it has, the rest cannot change that)
            return "Paris" in "".join(c.text for c in chunks if isinstance(c, Chunk))

        # Each a new chat with the same first message: its prompt's cache is kept from the
        # seed before, which gives the reply a fresh one gets (the test below holds that).
        demo_engine.reply(Prompt([{"role": "user", "content": QUESTION}], key="fresh"),
                          settings, chunks.append, named)
        answers.append("".join(c.text for c in chunks if isinstance(c, Chunk)))
    assert all("Paris" in a for a in answers), answers


def test_flags_given_win_over_the_models_defaults():
    parser = build_parser()
    for command in (["generate", "hi"], ["serve"], ["chat"]):
        args = parser.parse_args(command)
        assert DEMO.apply(sampling_from(args), given_sampling(args)) == SamplingParams(
            temperature=0.2, repetition_penalty=1.1)
        args = parser.parse_args([*command, "--temp", "0.7", "--top-k", "5"])
        assert given_sampling(args) == {"temperature", "top_k"}
        assert DEMO.apply(sampling_from(args), given_sampling(args)) == SamplingParams(
            temperature=0.7, top_k=5, repetition_penalty=1.1)


class DemoLike(FakeEngine):
    def __init__(self) -> None:
        super().__init__(moe=False)
        self.info.defaults = DEMO


async def test_the_app_starts_new_chats_at_the_models_defaults_and_says_so(tmp_path):
    app = ChatApp(DemoLike(), "demo", Store(tmp_path / "chats.db"),
                  settings=SamplingParams(max_tokens=256), given={"max_tokens"})
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.info is not None)
        want = SamplingParams(temperature=0.2, repetition_penalty=1.1, max_tokens=256)
        assert app.conversation.settings == want
        status = str(app.query_one("#status").render())
        assert "demo defaults: temp 0.2, penalty 1.1, max 256" in status, status
        await pilot.press("ctrl+n")
        assert app.conversation.settings == want
        app.conversation.set_settings(SamplingParams(temperature=0.5, repetition_penalty=1.1))
        app._status()
        status = str(app.query_one("#status").render())
        assert "demo defaults: penalty 1.1, temp 0.5" in status, status


def test_a_reused_cache_gives_the_penalised_reply_a_fresh_prompt_gets(demo_engine):
    """The demo's defaults turn the repetition penalty on, and the app and the server reuse
    caches: the penalty must count the cached prompt tokens too, or the same request would get
    another answer once cached. Oracle: mlx-lm's own loop over the whole prompt."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    from mlx_mixtral.generation.stream import prompt_ids, stream_generate

    model, tokenizer = demo_engine.model, demo_engine.session.tokenizer
    ids = prompt_ids(tokenizer, QUESTION)
    penalty = make_logits_processors(repetition_penalty=1.5, repetition_context_size=64)
    fresh = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=6,
                                              logits_processors=penalty,
                                              prompt_cache=model.make_cache())]
    cache = model.make_cache()
    model(mx.array([ids[:-1]]), cache=cache)  # the prompt but its last token, as a kept cache
    mx.eval([c.state for c in cache])
    ours = [c.token for c in stream_generate(
        model, tokenizer, ids[-1:], cache=cache, history=ids[:-1], temperature=0,
        repetition_penalty=1.5, max_tokens=6) if isinstance(c, Chunk) and c.token is not None]
    assert ours and ours == fresh[:len(ours)]


def test_generate_takes_the_demos_defaults_for_the_flags_not_given(monkeypatch, capsys):
    from mlx_mixtral import generation
    from mlx_mixtral.cli.main import main
    from mlx_mixtral.generation.stats import Stats

    used: list[SamplingParams] = []

    def run(model, tokenizer, ids, sampling=None, **kwargs):
        used.append(sampling)
        yield Stats()

    monkeypatch.setattr(generation, "stream_generate", run)
    assert main(["generate", "--model", "demo", QUESTION]) == 0
    assert main(["generate", "--model", "demo", "--temp", "0.7", QUESTION]) == 0
    assert used == [SamplingParams(temperature=0.2, repetition_penalty=1.1),
                    SamplingParams(temperature=0.7, repetition_penalty=1.1)]


def test_chat_with_a_server_leaves_the_settings_not_set_to_the_server():
    """The server knows its model's defaults (ours applies the demo's): `chat --server` sends
    only what the user set, and the longest reply."""
    from mlx_mixtral.app.http_engine import HttpEngine

    parser = build_parser()
    for flags, sent in ((["--top-k", "5"], {"top_k": 5}),
                        (["--temp", "0.7"], {"temperature": 0.7})):
        args = parser.parse_args(["chat", "--server", "http://127.0.0.1:9", *flags])
        engine = HttpEngine(args.server, given=given_sampling(args))
        body = engine.request(Prompt([]), sampling_from(args))
        settings = {k: v for k, v in body.items()
                    if k not in ("model", "messages", "stream", "stream_options")}
        assert settings == {**sent, "max_tokens": 512}
