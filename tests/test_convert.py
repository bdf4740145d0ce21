"""`mlx-mixtral convert`: precision against transformers, interop with mlx-lm, atomic output."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_hf, hf_logits, tiny_tokenizer
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_mixtral import load_model
from mlx_mixtral.convert import convert

SHAPES = dict(intermediate_size=128)  # divisible by the default group of 64
MODELS = {
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, **SHAPES)),
    "mistral": ("mistral", dict(sliding_window=8, **SHAPES)),
}


def make_source(name: str, tmp_path_factory):
    model_type, overrides = MODELS[name]
    folder = tmp_path_factory.mktemp(f"hf-{name}")
    ref = build_hf(folder, model_type, **overrides)
    tiny_tokenizer().save_pretrained(folder)
    # transformers 5 nests rope_theta; mlx-lm reads it at the top level (default 1e6).
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, ref


@pytest.fixture(scope="module", params=sorted(MODELS))
def source(request, tmp_path_factory):
    return make_source(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """For interop with mlx-lm, which has no sliding window: Mixtral without one."""
    return make_source("mixtral", tmp_path_factory)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_converted_logits_against_transformers(source, tmp_path, tokens, bits):
    folder, ref = source
    out = tmp_path / "out"
    summary = convert(folder, out, quantize=bits is not None, q_bits=bits or 4,
                      dtype="float32", shard_bytes=40_000, progress=False)
    assert summary.shards > 1
    ids = tokens(2, 20)
    expected = hf_logits(ref, ids)
    got = np.array(load_model(out)(mx.array(ids)))
    error = np.abs(got - expected)
    top1 = (got.argmax(-1) == expected.argmax(-1)).mean()
    print(f"\n{folder.name} bits={bits}: max |dlogits| {error.max():.2e}, mean "
          f"{error.mean():.2e} (logit std {expected.std():.2f}), top-1 agreement {top1:.0%}")
    if bits is None:
        assert error.max() <= 1e-4
    elif bits == 8:
        assert error.mean() <= 0.05 * expected.std() and top1 >= 0.9
    else:  # 4 bits: reported; sanity only
        assert error.mean() <= 0.5 * expected.std()


def test_q8_no_worse_than_mlx_lm(source, tmp_path, tokens):
    """Same weights, 8 bits: our precision plan is at least as faithful as mlx-lm's."""
    from mlx_lm import convert as mlx_lm_convert

    folder, ref = source
    ours_out, theirs_out = tmp_path / "ours", tmp_path / "theirs"
    convert(folder, ours_out, quantize=True, q_bits=8, dtype="float32", progress=False)
    mlx_lm_convert(str(folder), str(theirs_out), quantize=True, q_bits=8, dtype="float32")
    ids = tokens(2, 20)
    expected = hf_logits(ref, ids)
    if json.loads((folder / "config.json").read_text())["model_type"] == "mistral":
        expected = hf_logits(ref, ids[:, :8])  # mlx-lm ignores the window: stay inside it
        ids = ids[:, :8]
    ours = np.abs(np.array(load_model(ours_out)(mx.array(ids))) - expected).mean()
    theirs_model, _ = mlx_lm_load_model(theirs_out)
    theirs = np.abs(np.array(theirs_model(mx.array(ids))) - expected).mean()
    print(f"\n{folder.name} 8-bit mean |dlogits|: ours {ours:.3e}, mlx-lm {theirs:.3e}")
    assert ours <= theirs * 1.1


def test_output_folder_layout(source, tmp_path):
    folder, _ = source
    out = tmp_path / "q4"
    convert(folder, out, quantize=True, shard_bytes=30_000, progress=False)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"], quant["mode"]) == (4, 64, "affine")
    assert quant["lm_head"]["bits"] == 6 and quant["model.embed_tokens"]["bits"] == 6
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    if config["model_type"] == "mixtral":
        assert quant["model.layers.0.block_sparse_moe.gate"] is False  # router unquantized
        stacked = "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"
        assert stacked in index["weight_map"]
        assert not any(".experts." in k for k in index["weight_map"])


def test_our_q4_folder_loads_in_mlx_lm(mixtral, tmp_path, tokens):
    folder, _ = mixtral
    out = tmp_path / "q4"
    convert(folder, out, quantize=True, progress=False)
    theirs, _ = mlx_lm_load_model(out)
    ids = mx.array(tokens(1, 16))
    assert np.abs(np.array(theirs(ids)) - np.array(load_model(out)(ids))).max() <= 1e-4


def test_mlx_lm_q4_folder_loads_in_ours(mixtral, tmp_path, tokens):
    from mlx_lm import convert as mlx_lm_convert

    folder, _ = mixtral
    out = tmp_path / "mlx-lm-q4"
    mlx_lm_convert(str(folder), str(out), quantize=True, q_bits=4, q_group_size=64)
    theirs, _ = mlx_lm_load_model(out)
    ours = load_model(out)
    assert ours.layers[0].block_sparse_moe.gate.bits == 4  # theirs quantizes the router
    ids = mx.array(tokens(1, 16))
    assert np.abs(np.array(theirs(ids)) - np.array(ours(ids))).max() <= 1e-4


def test_existing_out_refused_then_forced(source, tmp_path, cli_here):
    folder, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = cli_here("convert", "--hf-path", str(folder), "--mlx-path", str(out))
    assert result.returncode == 2 and "--force" in result.stderr
    assert (out / "keep.txt").exists()
    result = cli_here("convert", "--hf-path", str(folder), "--mlx-path", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert "bits per weight" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_a_source_without_a_tokenizer_converts_with_a_note(tmp_path, cli_here):
    """The weights convert; the summary says what the folder lacks and where it goes, and the
    result is refused by `generate` with the same files named (not a silent unusable model)."""
    folder = tmp_path / "hf"
    build_hf(folder, "mistral")
    out = tmp_path / "out"
    result = cli_here("convert", "--hf-path", str(folder), "--mlx-path", str(out))
    assert result.returncode == 0, result.stderr
    note = result.stdout.strip().splitlines()[-1]
    assert note == (f"Note: the source had no tokenizer.model or tokenizer.json; copy the "
                    f"model's tokenizer files into {out} before generating with it")
    refused = cli_here("generate", "--model", str(out), "hi")
    assert refused.returncode == 2 and "no tokenizer.model or tokenizer.json" in refused.stderr
    tiny_tokenizer().save_pretrained(folder)
    with_one = cli_here("convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "o3"))
    assert with_one.returncode == 0 and "Note:" not in with_one.stdout


def test_verify_reports_agreement(source, tmp_path, cli_here):
    """The figures --verify prints, recomputed from transformers' logits and router choices."""
    import re

    import torch

    from mlx_mixtral.convert.verify import fixed_tokens
    from mlx_mixtral.model.routing import RouterTrace

    folder, ref = source
    out = tmp_path / "q8"
    result = cli_here("convert", "--hf-path", str(folder), "--mlx-path", str(out), "-q",
                 "--q-bits", "8", "--verify")
    assert result.returncode == 0, result.stderr
    line, verdict = result.stdout.strip().splitlines()[-2:]
    assert verdict.startswith("Verdict: as expected (mean KL <= 0.01 and top-1 >= 90%")
    numbers = dict(re.findall(r"(top-1 agreement|mean KL|same experts chosen) ([\d.e+-]+)", line))
    ids = np.array([fixed_tokens(folder, ref.config.vocab_size)])
    with torch.no_grad():
        hf = ref(torch.tensor(ids), output_router_logits="mixtral" in folder.name)
    want = hf.logits.float().numpy()[0].astype(np.float64)
    trace = RouterTrace()
    got = np.array(load_model(out)(mx.array(ids), router_trace=trace))[0].astype(np.float64)
    log_p = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - want.max(-1, keepdims=True)
    log_q = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - got.max(-1, keepdims=True)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
    top1 = float((want.argmax(-1) == got.argmax(-1)).mean())
    assert float(numbers["top-1 agreement"].rstrip("%")) / 100 == pytest.approx(top1, abs=1e-3)
    assert float(numbers["mean KL"]) == pytest.approx(kl, rel=0.05, abs=1e-6)
    assert top1 >= 0.9 and kl < 0.01  # 8 bits barely moves the model
    if "mixtral" in folder.name:
        theirs = [np.sort(np.argsort(-r.float().numpy(), -1)[:, :2], -1) for r in hf.router_logits]
        same = np.mean([(np.sort(np.array(t.indices)[0], -1) == h).all(-1)
                        for t, h in zip(trace, theirs, strict=True)])
        assert float(numbers["same experts chosen"].rstrip("%")) / 100 == pytest.approx(
            same, abs=1e-3)
    else:
        assert "same experts chosen" not in numbers


def test_verify_verdict_says_when_a_result_is_off():
    from mlx_mixtral.convert.verify import Verification

    good = Verification(64, 0.95, 0.004, None, bits=8)
    bad = Verification(64, 0.55, 0.9, None, bits=4)
    assert good.expected() and "as expected" in str(good)
    assert not bad.expected() and "worse than expected" in str(bad) and "--q-bits" in str(bad)
    assert "float conversion" in Verification(64, 1.0, 0.0, None).verdict()


def test_dequantize_round_trip(mixtral, tmp_path, tokens, cli_here):
    folder, _ = mixtral
    q4, back = tmp_path / "q4", tmp_path / "float"
    convert(folder, q4, quantize=True, dtype="float32", progress=False)
    result = cli_here("convert", "--hf-path", str(q4), "--mlx-path", str(back), "--dequantize")
    assert result.returncode == 0, result.stderr
    assert "quantization" not in json.loads((back / "config.json").read_text())
    ids = mx.array(tokens(1, 12))
    assert np.abs(np.array(load_model(back)(ids)) - np.array(load_model(q4)(ids))).max() <= 1e-4
    again = cli_here("convert", "--hf-path", str(q4), "--mlx-path", str(tmp_path / "x"), "-q")
    assert again.returncode == 2 and "already quantized" in again.stderr


CONVERT_MISTAKES = [  # (convert()'s arguments, the same on the command line, the message)
    (dict(quantize=True, dequantize=True), ["-q", "--dequantize"],
     "{quantize} (or {recipe}, {expert_bits}) and {dequantize} exclude each other"),
    (dict(recipe="mixed-3-4", expert_bits=2), ["--recipe", "mixed-3-4", "--expert-bits", "2"],
     "{recipe} sets the expert bits itself; leave out {expert_bits}"),
    (dict(), [], "already exists; pass {force} to replace it"),
]
API_NAMES = dict(quantize="quantize=True", dequantize="dequantize=True", recipe="recipe",
                 expert_bits="expert_bits", force="force=True")
CLI_NAMES = dict(quantize="--quantize", dequantize="--dequantize", recipe="--recipe",
                 expert_bits="--expert-bits", force="--force")


@pytest.mark.parametrize("kwargs, argv, message", CONVERT_MISTAKES)
def test_convert_errors_name_its_parameters_and_the_cli_its_flags(tmp_path, capsys, kwargs,
                                                                 argv, message):
    """convert()'s refusals name its parameters (`recipe`, `force=True`); the command line
    says its flags in their place (cli/flags.py `with_flags`). Refused before a file is read."""
    from mlx_mixtral.cli.main import main
    from mlx_mixtral.errors import ConvertError

    out = tmp_path / "out"
    if "already exists" in message:
        out.mkdir()
    with pytest.raises(ConvertError) as refused:
        convert(tmp_path, out, progress=False, **kwargs)
    assert message.format(**API_NAMES) in str(refused.value)
    assert main(["convert", "--hf-path", str(tmp_path), "--mlx-path", str(out), *argv]) == 2
    assert message.format(**CLI_NAMES) in capsys.readouterr().err
    with pytest.raises(ConvertError, match=r"^q_bits=9 is not one of 2, 3, 4, 5, 6, 8$"):
        convert(tmp_path, tmp_path / "other", quantize=True, q_bits=9, progress=False)
