"""Tiny Hugging Face reference models, built and saved by the tests themselves (no downloads)."""

from __future__ import annotations

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


class Numbers:
    """Token ids as text, for a model without a tokenizer."""

    eos_ids: frozenset[int] = frozenset()

    def detokenizer(self):
        return self

    def add_token(self, token: int) -> str:
        return f" {token}"

    def finalize(self) -> str:
        return ""


@pytest.fixture(scope="session", autouse=True)
def private_user_folders(tmp_path_factory):
    """Tests and the commands they start never touch the user's own data and cache folders."""
    import os

    names = ("MLX_MIXTRAL_CACHE_DIR", "MLX_MIXTRAL_DATA_DIR", "MLX_MIXTRAL_CONFIG_DIR")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["MLX_MIXTRAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["MLX_MIXTRAL_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    os.environ["MLX_MIXTRAL_CONFIG_DIR"] = str(tmp_path_factory.mktemp("config"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
