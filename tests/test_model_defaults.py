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

        def named() -> bool:  # (once it has, the rest of the reply cannot change that)
            return "Paris" in "".join(c.text for c in chunks if isinstance(c, Chunk))

        demo_engine.reply(Prompt([{"role": "user", "content": QUESTION}], key=f"fresh-{seed}"),
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
