"""Package namespaces that import their modules on first use (PEP 562).

mlx-lm imports transformers when it is first imported, which takes seconds; the command line
reads flags and defaults from our packages without paying for that.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose `exports` map a name to the module
    (relative to the package) that defines it."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:  # noqa: N807 (PEP 562's name for a module's hook)
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807 (PEP 562)
        # The public names and the module's dunders: not the helpers and submodules that
        # importing it leaves in its namespace (TYPE_CHECKING, annotations, lazy, units...).
        return sorted({*exports, *(n for n in namespace if n.startswith("__"))})

    return __getattr__, __dir__
