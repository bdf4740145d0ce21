"""The built wheel installs everything under the `mlx_mixtral` namespace and imports alone."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow  # builds and installs a wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("mlx_mixtral-*.whl")
    return path


def test_wheel_layout_and_metadata(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mlx_mixtral"}
    for module in ("mlx_mixtral/app/__init__.py", "mlx_mixtral/convert/__init__.py",
                   "mlx_mixtral/model/decoder.py", "mlx_mixtral/model/cache.py",
                   "mlx_mixtral/model/moe.py", "mlx_mixtral/loading/loader.py",
                   "mlx_mixtral/text/chat_format.py", "mlx_mixtral/generation/stream.py",
                   "mlx_mixtral/cli/main.py"):
        assert module in names
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert 'mlx[cpu]>=0.29; sys_platform == "linux"' in text
    assert 'mlx>=0.29; sys_platform != "linux"' in text
    assert "torch" not in text.split("Provides-Extra: test")[0]  # test-only dependency


def test_imports_from_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    # -S skips .pth files, so the editable install of this checkout cannot shadow the wheel.
    code = f"""
import importlib.util, sys
sys.path[:0] = [{str(target)!r}]
sys.path += {site.getsitepackages()!r}
import mlx_mixtral, mlx_mixtral.app, mlx_mixtral.convert
from mlx_mixtral import Model, ModelArgs
assert mlx_mixtral.__file__.startswith({str(target)!r}), mlx_mixtral.__file__
assert importlib.util.find_spec("app") is None and importlib.util.find_spec("convert") is None
args = ModelArgs.from_dict(dict(model_type="mixtral", vocab_size=16, hidden_size=8,
    intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
import mlx.core as mx
print(Model(args)(mx.array([[1, 2, 3]])).shape)
"""
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 16)"
