"""Put on PYTHONPATH by tests/conftest.py for the commands the tests start: while
MLX_MIXTRAL_TESTS_HIDE_TORCH=1, `torch` cannot be found, so transformers (which mlx-lm imports)
skips it. The product never uses torch; torch is a test dependency of the in-process parity
tests only, and importing it costs each command about 2 s.

A search that cannot find torch, rather than a `None` in `sys.modules`: `"torch" in sys.modules`
stays false, and code that imports torch fails with the ordinary ModuleNotFoundError.
"""

from __future__ import annotations

import os
import sys


def _hide_torch() -> None:
    from importlib.machinery import PathFinder

    class HideTorch:
        """`PathFinder`, except that it finds no `torch`."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                return None
            return PathFinder.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(PathFinder, attribute)

    sys.meta_path[:] = [HideTorch() if f is PathFinder else f for f in sys.meta_path]


def _chain() -> None:
    """Run the `sitecustomize` this one shadows, if there is one."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "sitecustomize.py")
        if os.path.abspath(entry or os.getcwd()) != here and os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if os.environ.get("MLX_MIXTRAL_TESTS_HIDE_TORCH") == "1":
    _hide_torch()
_chain()
