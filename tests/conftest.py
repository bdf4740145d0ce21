"""Tiny Hugging Face reference models, built and saved by the tests themselves (no downloads)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch  # the reference implementation: a test dependency, never skipped
import transformers

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0,
            # A wide init gives O(1) logits and peaked attention, so small errors show up.
            initializer_range=0.15, attn_implementation="eager")


# The commands the tests start (the CLI, servers, ranks) never need torch or mistral-common,
# test dependencies that cost each of them seconds to import (through transformers and gguf).
# They inherit this environment (`hide_packages`, set for the session): a `sitecustomize` on
# their path hides both (see its docstring). The pytest processes keep them: the reference
# implementations run there.
HIDDEN = ("torch", "mistral_common")


def seeing(*visible: str) -> dict[str, str]:
    """The environment for a command that must find `visible` among the hidden packages (to
    import it, or to check that it does not)."""
    env = dict(os.environ)
    env["MLX_MIXTRAL_TESTS_HIDE"] = ",".join(h for h in HIDDEN if h not in visible)
    return env


# ---- running in parallel ---------------------------------------------------------------------
# The suite runs on two pytest-xdist workers (pyproject's addopts), a file at a time per worker.
# A test marked `alone` races the clock (kills at random moments of a command's work, answers
# within a deadline): no other test runs while it does. Two advisory locks shared by the
# workers: every test holds `run` (shared, or exclusive when alone); `gate` makes a waiting
# `alone` test go next instead of waiting for a gap between the other worker's tests.


def lock_files() -> tuple[Path, Path] | None:
    """(gate, run) for this xdist run; None outside xdist."""
    import tempfile

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return None
    stem = Path(tempfile.gettempdir()) / f"mlx-mixtral-tests-{run_id}"
    return stem.with_suffix(".gate"), stem.with_suffix(".run")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    locks = lock_files()
    if locks is None:  # not under xdist: nothing runs beside this test
        yield
        return
    import fcntl

    alone = item.get_closest_marker("alone") is not None
    with open(locks[0], "a") as gate, open(locks[1], "a") as run:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(run, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(run, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


def pytest_sessionfinish(session):
    """A worker whose tests are done removes the lock files: the other one, if still running,
    needs no locks, and opens them anew for each test."""
    for path in lock_files() or ():
        path.unlink(missing_ok=True)


# The longest files first, so that neither worker is left with a long file at the end.
# Every file over about 20 s is named (measured on CI), so the last files to start are short.
LONGEST_FIRST = ["test_server.py", "test_distributed.py", "test_readme.py", "test_server_stop.py",
                 "test_request_fields.py", "test_clients.py", "test_tool_choice.py",
                 "test_batching.py", "test_expert_paging.py", "test_server_load.py",
                 "test_drafting.py",
                 "test_cli.py", "test_model_defaults.py", "test_store_faults.py",
                 "test_prefix_store.py", "test_server_metrics.py", "test_convert_faults.py",
                 "test_fuzz.py", "test_server_fuzz.py", "test_app.py", "test_app_e2e.py",
                 "test_app_issue27.py", "test_server_prefixes.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


class Numbers:
    """Token ids as text, for a model without a tokenizer."""

    eos_ids: frozenset[int] = frozenset()

    def detokenizer(self):
        return self

    def add_token(self, token: int) -> str:
        return f" {token}"

    def finalize(self) -> str:
        return ""


@contextlib.contextmanager
def environment(**values: str):
    """`os.environ` with `values` set, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def private_user_folders(tmp_path_factory):
    """Tests and the commands they start never touch the user's own data and cache folders."""
    with environment(**{f"MLX_MIXTRAL_{what.upper()}_DIR": str(tmp_path_factory.mktemp(what))
                        for what in ("cache", "data", "config")}):
        yield


@pytest.fixture(scope="session", autouse=True)
def hide_packages():
    """The commands started by the tests of this session do not find `HIDDEN`. (Set here, in
    the process that runs the tests: xdist's workers are commands its controller starts.)"""
    path = [str(Path(__file__).with_name("hide_packages")),
            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    with environment(PYTHONPATH=os.pathsep.join(path), MLX_MIXTRAL_TESTS_HIDE=",".join(HIDDEN)):
        yield


@pytest.fixture
def cli_here(capsys):
    """`mlx-mixtral ARGS` run by `main` in this process (`cli_helpers.in_process`): for tests
    of what a command says and does, not of its process."""
    import functools

    from cli_helpers import in_process

    return functools.partial(in_process, capsys)


def build_hf(folder: Path, model_type: str, seed: int = 0, **overrides):
    """Save a random tiny Mistral or Mixtral with `save_pretrained`; return the torch model."""
    torch.manual_seed(seed)
    kwargs = {**BASE, **overrides}
    attn = kwargs.pop("attn_implementation")
    if model_type == "mistral":
        config = transformers.MistralConfig(**kwargs)
        model = transformers.MistralForCausalLM(config)
    else:
        kwargs.setdefault("sliding_window", None)
        config = transformers.MixtralConfig(**kwargs)
        model = transformers.MixtralForCausalLM(config)
    model.config._attn_implementation = attn
    model.eval()
    model.save_pretrained(folder)
    return model


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary: tokens t1 .. t127."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, BASE["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="t2", bos_token="t1", unk_token="<unk>")


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture
def tokens():
    def make(batch: int, length: int, vocab: int = BASE["vocab_size"], seed: int = 1):
        return np.random.RandomState(seed).randint(0, vocab, (batch, length))

    return make
