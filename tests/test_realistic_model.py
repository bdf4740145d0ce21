"""The realistic tiny Mixtral (bench's `mixtral-realistic`): its layers change the residual
stream as little as a trained model's, measured against SmolLM2 (the demo GGUF)."""

from __future__ import annotations

import numpy as np

from mlx_mixtral.cli.bench import PRESETS, SMOLLM2_LAYER_COSINE, preset_folder
from mlx_mixtral.demo import demo_model_path
from mlx_mixtral.loading import load
from mlx_mixtral.model.residual_stream import consecutive_cosines

# The prompt SMOLLM2_LAYER_COSINE was measured over (37 tokens).
PROMPT = ("The quick brown fox jumps over the lazy dog. In the beginning, the universe was "
          "created. This has made a lot of people very angry and been widely regarded as a "
          "bad move.")
TOLERANCE = 0.03  # on the mean over the layers


def test_smollm2_changes_its_stream_as_recorded():
    """The recorded figure is SmolLM2's own: measured again here (about 15 s on two busy
    cores: the demo's Q4_1 weights, 30 layers)."""
    model, tokenizer = load(demo_model_path())
    cosines = consecutive_cosines(model, tokenizer.encode(PROMPT))
    assert len(cosines) == 29
    assert abs(np.mean(cosines) - SMOLLM2_LAYER_COSINE) < 0.01, cosines


def test_the_realistic_preset_changes_its_stream_as_little_as_smollm2():
    model, _ = load(preset_folder("mixtral-realistic"), tokenizer=False)
    vocab = PRESETS["mixtral-realistic"]["vocab_size"]
    tokens = np.random.RandomState(0).randint(3, vocab, 96).tolist()
    cosines = consecutive_cosines(model, tokens)
    assert len(cosines) == PRESETS["mixtral-realistic"]["num_hidden_layers"] - 1
    assert abs(np.mean(cosines) - SMOLLM2_LAYER_COSINE) < TOLERANCE, cosines
