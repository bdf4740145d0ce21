"""`mlx_mixtral.load`: every form of weights, lazily, with clear refusals."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf, hf_logits, tiny_tokenizer

import mlx_mixtral
from mlx_mixtral import WeightsError
from mlx_mixtral.demo import demo_model_path


def test_folder_with_tokenizer(tmp_path, tokens):
    ref = build_hf(tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = mlx_mixtral.load(tmp_path)
    assert tokenizer.encode("t5 t7") == [5, 7]
    ids = tokens(1, 10)
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(ref, ids)).max() <= 1e-4


def test_gguf_file_with_its_tokenizer():
    model, tokenizer = mlx_mixtral.load(demo_model_path())
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert model.args.vocab_size == 49152


def test_offline_repo_id_error_names_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="'mistralai/Mixtral-8x7B-v0.1'"):
        mlx_mixtral.load("mistralai/Mixtral-8x7B-v0.1")


@pytest.mark.parametrize("name", ["model.bin", "weights.pt", "consolidated.00.pth"])
def test_pickles_are_never_opened(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")  # a malicious pickle
    with pytest.raises(WeightsError, match="pickled weights are refused"):
        mlx_mixtral.load(path)


def test_not_a_model(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        mlx_mixtral.load(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match="not a model file: a model is a folder with "
                       "config.json"):
        mlx_mixtral.load(tmp_path / "notes.txt")


LAZY_PROBE = """
import sys
import mlx.core as mx
from mlx_mixtral import load_model
def rss():  # peak RSS of this process image (ru_maxrss would include pytest's, from the fork)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
base = rss()
model = load_model(sys.argv[1])
after_load = rss()
for layer in model.layers:  # evaluate layer by layer, as a first forward pass would
    mx.eval(layer.parameters())
mx.eval(model.parameters())
print(after_load - base, rss() - base)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc")
@pytest.mark.slow
def test_load_is_lazy_and_holds_one_copy(tmp_path):
    from mlx_mixtral import ModelArgs
    from mlx_mixtral.convert.synthetic import write_hf_checkpoint

    args = ModelArgs.from_dict(dict(
        model_type="mixtral", vocab_size=1024, hidden_size=512, intermediate_size=1024,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        num_local_experts=8))
    size = write_hf_checkpoint(tmp_path, args, dtype=mx.float32, shard_bytes=10**8)
    out = subprocess.run([sys.executable, "-c", LAZY_PROBE, str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.split()
    grew_on_load, peak = map(int, out)
    print(f"\ncheckpoint {size / 1e6:.0f} MB: load grew RSS {grew_on_load / 1e6:.0f} MB, "
          f"peak after evaluation {peak / 1e6:.0f} MB")
    assert grew_on_load < 0.1 * size
    assert peak < 1.3 * size
