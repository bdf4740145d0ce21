"""Put on PYTHONPATH by tests/conftest.py for the commands the tests start: the packages named
in MLX_MIXTRAL_TESTS_HIDE (comma-separated) cannot be found.

The product never uses torch or mistral-common: they are test dependencies, for the reference
implementations the tests run in their own process. Installed, they cost each command about
2 s (torch: transformers, which mlx-lm imports, imports it) and 1.5 s (mistral-common: gguf
imports it) for nothing. Hidden, the commands import what a user's install imports.

A search that finds nothing, rather than a `None` in `sys.modules`: `"torch" in sys.modules`
stays false, and code that imports a hidden package fails with the ordinary
ModuleNotFoundError.
"""

from __future__ import annotations

import os
import sys


def _hide(hidden: set[str]) -> None:
    from importlib.machinery import PathFinder

    class Hide:
        """`PathFinder`, except that it finds none of `hidden`."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                return None
            return PathFinder.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(PathFinder, attribute)

    sys.meta_path[:] = [Hide() if f is PathFinder else f for f in sys.meta_path]


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


_hidden = set(filter(None, os.environ.get("MLX_MIXTRAL_TESTS_HIDE", "").split(",")))
if _hidden:
    _hide(_hidden)
_chain()
